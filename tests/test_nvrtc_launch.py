"""`nvrtc.launch`'s driver structures match the CUDA headers' layout (cuLaunchKernelEx reads them as C structs: a
wrong offset would launch with garbage), and a kernel built without PDL is launched as torch launches it."""
import ctypes

from longkv.kernels import nvrtc


def test_launch_structs_have_the_driver_layout():
    assert ctypes.sizeof(nvrtc._Attr) == 72                  # id, pad[4], a 64-byte union
    assert nvrtc._Attr.value.offset == 8
    assert ctypes.sizeof(nvrtc._Config) == 56
    assert [getattr(nvrtc._Config, f).offset for f in ("grid", "block", "shared", "stream", "attrs", "nattrs")] == \
        [0, 12, 24, 32, 40, 48]


def test_a_kernel_without_pdl_is_called_as_torch_calls_it():
    calls = []

    class Kern:
        def __call__(self, **kw):
            calls.append(kw)

    nvrtc.launch(Kern(), (2, 1, 1), (32, 1, 1), [1, 2.0])
    assert calls == [dict(grid=(2, 1, 1), block=(32, 1, 1), args=[1, 2.0], shared_mem=0)]
