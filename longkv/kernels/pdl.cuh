// Programmatic dependent launch (sm_90+; nvrtc.py: PDL). A kernel launched with it may be scheduled while the
// kernel before it in the stream still runs. PDL_ENTER(), its first statement, lets the next kernel's blocks be
// scheduled once all of this one's have started (griddepcontrol.launch_dependents), then waits until the kernel
// before has finished and its writes are visible (griddepcontrol.wait): the launch and the blocks' start overlap
// the previous kernel's last wave instead of following it. Without PDL defined, nothing.
#if defined(PDL) && PDL
#define PDL_ENTER() asm volatile("griddepcontrol.launch_dependents;\n\tgriddepcontrol.wait;" ::: "memory")
#else
#define PDL_ENTER() ((void)0)
#endif
