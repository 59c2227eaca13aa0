"""Export a checkpoint of any system to an engine directory: ONNX graphs per component, quantized as asked.

    loaded = Runtime.from_checkpoint("ckpt/").engine     # or a system's load_checkpoint / synthesize
    export_engine(loaded, "engine/", precision="int4")

The system (``loaded.system``, looked up in :mod:`edgeav.systems`) says what its graphs are: its
record's ``export`` (:class:`~edgeav.engines.spec.SystemExport`) emits each component through a
:class:`GraphWriter` with an example input and, for int8, its calibration feeds. The writer traces
each (:func:`~edgeav.export.trace.export_graph`: TorchScript's tracer where a check proves its graph
right, torch.export otherwise; fp32, or fp16 inside with fp32 inputs and outputs:
:class:`~edgeav.export.trace.Float16IO`); ``int8`` then quantizes the encoders and decoders statically
(QDQ, per-channel weights, symmetric activations as TensorRT wants) and stores the LLM's weight MatMuls
in 8 bits, ``int4`` in 4, with onnxruntime's MatMulNBits (a LoRA stays fp32; a TensorRT engine, whose
parser has no MatMulNBits, keeps its LLM fp32). The files are written to a
temporary directory beside the target and moved into place only when complete; the manifest
records the system, every file's hash, the source checkpoint's digest, the tools and the
system's fidelity receipt. An export whose inputs match one already in the cache
(``$EDGEAV_CACHE``, default ``~/.cache/edgeav``) is copied from there (a reflink where the file
system offers one, never a hard link). Beside it, every traced fp32 or fp16 graph is kept by what fixes it
(checkpoint, system options, tool versions, graph), so an export of the same checkpoint at another precision
reuses the graphs instead of tracing them again. Every step says when it starts and, while it runs, how long
it has taken so far (:func:`heartbeat`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgeav import __version__
from edgeav.engines.manifest import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_INT4_ACCURACY,
    PRECISIONS,
    WEIGHT_ONLY_BITS,
    check_export_options,
    read_manifest,
    sha256_file,
    verify_files,
    write_json_atomic,
)
from edgeav.engines.manifest_schema import ENGINE_FORMAT, ENGINE_FORMAT_VERSION, MANIFEST, Precision
from edgeav.engines.spec import SystemExport
from edgeav.errors import EdgeavError, OptionError
from edgeav.outputs import usual_folder_mode
from edgeav.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from edgeav.export.graphs import GraphSpec
from edgeav.export.trace import Float16IO, export_graph, quiet_loggers

Progress = Callable[[str], None]


def system_export_of(loaded) -> SystemExport:
    """The export record of ``loaded``'s system, or a one-line OptionError when it cannot be exported."""
    from edgeav.systems import get_system  # the registry, never a system by name

    owner = get_system(loaded.system)
    if owner.export is None:
        raise OptionError(f"exporting {owner.title} is not built yet; run it from its checkpoint "
                          "(edgeav run --checkpoint)")
    return owner.export()


def checkpoint_digest(loaded) -> str:
    """SHA-256 over the config, the tokenizer's files (its model and settings: ``legacy`` changes prompt ids) and
    every tensor the system's export reads (names, dtypes, shapes, bytes), whatever the file layout."""
    digest = hashlib.sha256()
    digest.update(json.dumps(loaded.config.to_dict(), sort_keys=True).encode())
    for name, data in sorted(loaded.tokenizer.files().items()):
        digest.update(f"tokenizer/{name}/{len(data)}".encode())
        digest.update(data)
    states = system_export_of(loaded).weights(loaded)
    for name in sorted(states):
        for key in sorted(states[name]):
            tensor = states[name][key].detach().cpu().contiguous()
            digest.update(f"{name}/{key}/{tensor.dtype}/{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class GraphWriter:
    """Writes one export's graphs and tables into its work folder, each component at the precision the
    row gives it; a system's ``build`` calls :meth:`emit` once per graph.

    ``trace_key``: what fixes every traced graph of this export apart from the graph itself (the
    checkpoint's digest, the system's options, the tool versions); with it, each traced fp32 or fp16 graph is
    kept in the graph cache (:func:`graph_cache_dir`) and a later export of the same checkpoint, at any
    precision, reuses it instead of tracing again (an int4 export after an fp32 one traces nothing: its
    encoders are the fp32 graphs and its LLM is quantized from the fp32 one). None: no graph cache.
    """

    def __init__(self, work: Path, row: Precision, progress: Progress, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 accuracy_level: int = DEFAULT_INT4_ACCURACY, trace_key: str | None = None) -> None:
        self.work = work
        self.row = row
        self.block_size = block_size
        self.accuracy_level = accuracy_level
        self.progress = progress
        self.trace_key = trace_key
        self.graphs: dict[str, dict] = {}
        self._fp32 = work / "fp32"
        self._fp32.mkdir()

    def emit(self, name: str, component: str, module: nn.Module, spec: GraphSpec, example: tuple[torch.Tensor, ...],
             *, calibration: Callable[[], list[dict[str, np.ndarray]]] | None = None) -> None:
        """Export ``module`` as graph ``name`` (file ``name.onnx``) of ``component``. ``calibration`` gives the
        int8 feeds (called only when the component is int8)."""
        component_precision = self.row.components[component]
        start = time.perf_counter()
        traced = "fp16" if component_precision == "fp16" else "fp32"
        path = self._fp32 / f"{name}.onnx"
        key = None if self.trace_key is None else _graph_key(self.trace_key, name, component, traced, spec, example)
        reused = False
        if key is not None and (graph_cache_dir() / key).is_dir():
            with heartbeat(self.progress, f"{name}: checking the cached graph"):
                reused = _graph_from_cache(key, path)
        if reused:
            origin = f"{traced} graph reused from the graph cache"
        else:
            wrapped = Float16IO(module) if component_precision == "fp16" else module
            with heartbeat(self.progress, f"{name}: tracing ({traced})"):
                origin = f"traced by {export_graph(wrapped, spec, example, path)}"
            if key is not None:
                _graph_to_cache(key, path)
        final = self.work / f"{name}.onnx"
        if component_precision == "int8":
            from edgeav.export.quantize import quantize_int8_qdq

            if calibration is None:
                raise EdgeavError(f"{name}: int8 needs calibration inputs and the system gives none")
            with heartbeat(self.progress, f"{name}: calibrating and quantizing (int8)"):
                feeds = calibration()
                with quiet_loggers():
                    quantize_int8_qdq(path, final, feeds)
        elif component_precision in WEIGHT_ONLY_BITS:
            from edgeav.export.quantize import quantize_weights

            with heartbeat(self.progress, f"{name}: quantizing ({component_precision})"), quiet_loggers():
                quantize_weights(path, final, WEIGHT_ONLY_BITS[component_precision], self.block_size, module,
                                 self.accuracy_level)
        else:
            _move_model(path, final)
        self.graphs[name] = {"file": final.name, "component": component, "precision": component_precision}
        self.progress(f"{name}: {component_precision}, {final.stat().st_size / 1e6:.1f} MB "
                      f"in {time.perf_counter() - start:.0f} s ({origin})")

    def save_table(self, file: str, table: torch.Tensor) -> str:
        """``table`` (a token embedding table) as fp32 ``file`` (.npy), once per name; -> ``file``."""
        if not (self.work / file).exists():
            np.save(self.work / file, table.detach().float().cpu().numpy())
        return file

    def finish(self) -> None:
        shutil.rmtree(self._fp32)


HEARTBEAT_S = 15.0  # how often a long step says it is still running


@contextlib.contextmanager
def heartbeat(progress: Progress, label: str, every: float = HEARTBEAT_S):
    """Say ``label`` now, then ``label``, with the seconds so far, every ``every`` s until the block ends, so
    that a step of minutes (tracing a 7 B LLM) is never silent."""
    progress(label)
    start, done = time.perf_counter(), threading.Event()

    def tick() -> None:
        while not done.wait(every):
            try:
                progress(f"{label}, {time.perf_counter() - start:.0f} s so far")
            except Exception:  # a closed pipe or terminal: the step goes on, silent
                return

    ticker = threading.Thread(target=tick, name="edgeav-export-heartbeat", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def export_engine(
    loaded,
    out: str | Path,
    *,
    fmt: str = "onnx",
    precision: str = "fp32",
    block_size: int = DEFAULT_BLOCK_SIZE,
    accuracy_level: int = DEFAULT_INT4_ACCURACY,
    calibration: str = "demo",
    merge_lora: bool = False,
    receipt_n: int = 4,
    variants: tuple[str, ...] | None = None,
    use_cache: bool = True,
    progress: Progress = lambda message: None,
) -> Path:
    """Export ``loaded`` (a model of any system that exports) to the engine directory ``out`` and return it
    (see the module docstring).

    ``variants`` and ``merge_lora`` are system options (Crab's weight variants and I-LoRA merge); a
    system refuses one it does not take. ``receipt_n``: demo inputs per task of the receipt (0: none).
    """
    spec = system_export_of(loaded)
    row = check_export_options(fmt, precision, block_size, accuracy_level)
    system_options = spec.options(loaded, variants=variants, merge_lora=merge_lora)
    if fmt == "tensorrt":
        from edgeav.export.tensorrt import import_tensorrt

        import_tensorrt()  # fail before minutes of exporting, not after
    if calibration != "demo":
        raise OptionError(f"--calibration {calibration!r}: expected demo (the system's synthetic demo inputs)")
    if receipt_n < 0:
        raise OptionError(f"--receipt-n must be >= 0, got {receipt_n}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: is a file; -o names the engine directory to write")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise OptionError(f"{out}: exists and is not an engine directory; pick an empty or new -o")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"{out.parent}: cannot create it ({e.strerror}); pick a writable -o") from None
    source_digest = checkpoint_digest(loaded)
    if fmt == "tensorrt":  # TensorRT's parser has no MatMulNBits: its LLM stays fp32
        row = _without_weight_only(row)
    nbits = row.components["llm"] in WEIGHT_ONLY_BITS
    options = {"format": fmt, "precision": precision, "block_size": block_size if nbits else None,
               "accuracy_level": accuracy_level if nbits else None, "calibration": calibration, **system_options,
               "receipt_n": receipt_n}
    tools = {**_tool_versions(), "code": code_digest()}
    cache_key = hashlib.sha256(json.dumps({"source": source_digest, "options": options, **tools},
                                          sort_keys=True).encode()).hexdigest()[:32]
    if use_cache and _serve_from_cache(cache_key, out, progress):
        return out

    try:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise OptionError(f"{out.parent}: cannot write there ({e.strerror}); pick a writable -o") from None
    try:
        trace_key = hashlib.sha256(json.dumps({"source": source_digest, "options": system_options, **tools},
                                              sort_keys=True).encode()).hexdigest() if use_cache else None
        system_row = spec.precisions[row.name]
        manifest = _build(loaded, spec, work, _without_weight_only(system_row) if fmt == "tensorrt" else system_row,
                          fmt, options, progress, trace_key)
        manifest.update({"cache_key": cache_key, "options": options,
                         "source": {"checkpoint": loaded.source, "digest": source_digest}})
        write_json_atomic(work / MANIFEST, manifest)
        if receipt_n and fmt == "tensorrt":
            manifest["receipt"] = {"skipped": "TensorRT engines have no runtime backend in edgeav yet, so the "
                                              "receipt comes from the onnx export of the same precision"}
            write_json_atomic(work / MANIFEST, manifest)
        elif receipt_n:
            manifest["receipt"] = spec.receipt(loaded, work, n=receipt_n, options=options, progress=progress)
            write_json_atomic(work / MANIFEST, manifest)
        _replace_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if use_cache:
        _store_in_cache(cache_key, out)
    return out


def _without_weight_only(row: Precision) -> Precision:
    """``row`` with its weight-only (MatMulNBits) components in fp32."""
    components = {name: "fp32" if value in WEIGHT_ONLY_BITS else value for name, value in row.components.items()}
    return dataclasses.replace(row, components=components)


def _build(loaded, spec: SystemExport, work: Path, row: Precision, fmt: str, options: dict, progress: Progress,
           trace_key: str | None) -> dict:
    int4_options = {key: options[key] for key in ("block_size", "accuracy_level") if options[key] is not None}
    writer = GraphWriter(work, row, progress, trace_key=trace_key, **int4_options)
    system_keys = spec.build(loaded, writer, options)
    writer.finish()
    loaded.tokenizer.save(work)  # its own files (Crab's legacy setting changes prompt ids; Crab+ names its files)
    graphs = writer.graphs
    if fmt == "tensorrt":
        from edgeav.export.tensorrt import build_engines

        graphs = build_engines(work, graphs, lambda component: spec.profiles(component, loaded.config), row.name,
                               progress)
    files = {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.is_file() and p.name != MANIFEST}
    return {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "system": spec.system,
        "backend": fmt,
        "precision": row.name,
        "components": row.components,
        "config": loaded.config.to_dict(),
        "graphs": graphs,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_config": TOKENIZER_CONFIG_FILE,
        **system_keys,  # a system whose tokenizer has other files names them here
        "files": files,
        "tools": _tool_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _move_model(source: Path, target: Path) -> None:
    os.replace(source, target)
    data = source.with_name(source.name + ".data")
    if data.exists():
        os.replace(data, target.with_name(target.name + ".data"))


def _tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {"edgeav": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


@functools.cache
def code_digest() -> str:
    """SHA-256 over edgeav's own Python files (the package and its export machinery): part of both caches'
    keys, so an edited wrapper or model never gets a graph traced from the code before the edit."""
    import edgeav
    import edgeav.export

    digest = hashlib.sha256()
    for root in sorted({Path(edgeav.__file__).parent, Path(edgeav.export.__file__).parent}):
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{path.relative_to(root.parent)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _copy_engine(folder: Path, manifest: dict, work: Path) -> None:
    """Copy the files ``manifest`` lists and the manifest itself from ``folder`` into ``work``."""
    for name in (*manifest["files"], MANIFEST):
        copy_file(folder / name, work / name)


def _replace_dir(work: Path, out: Path) -> None:
    """Move the finished ``work`` to ``out``; an old engine there is replaced only once the new one is complete."""
    work.chmod(usual_folder_mode())  # mkdtemp makes it private; the engine gets the usual folder mode
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEAV_CACHE") or Path.home() / ".cache" / "edgeav") / "engines"


def graph_cache_dir() -> Path:
    """Where traced graphs are kept between exports (beside the engines' cache)."""
    return cache_dir().parent / "graphs"


def _graph_key(trace_key: str, name: str, component: str, traced: str, spec: GraphSpec,
               example: tuple[torch.Tensor, ...]) -> str:
    """The graph cache's key of one traced graph: the export's ``trace_key``, the graph's name, component,
    traced precision, spec and example shapes."""
    inputs = [(str(t.dtype), tuple(t.shape)) for t in example]
    text = json.dumps({"export": trace_key, "name": name, "component": component, "traced": traced,
                       "spec": repr(spec), "example": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _graph_files(path: Path) -> list[Path]:
    """A graph's files: ``name.onnx`` and, for one over 2 GB, its external ``name.onnx.data``."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def _graph_from_cache(key: str, path: Path) -> bool:
    """Copy the cached graph ``key`` to ``path`` when every one of its files still has the hash it was stored
    with; False when there is none (or a damaged one, which is removed)."""
    entry = graph_cache_dir() / key
    try:
        hashes = json.loads((entry / "hashes.json").read_text())
        if not isinstance(hashes, dict) or path.name not in hashes:
            raise ValueError("no hash of the graph")
        for name, digest in hashes.items():
            if sha256_file(entry / name) != digest:
                raise ValueError(f"{name} changed")
        for name in hashes:
            copy_file(entry / name, path.with_name(name))
    except (OSError, ValueError):
        shutil.rmtree(entry, ignore_errors=True)
        for name in (path.name, path.name + ".data"):
            path.with_name(name).unlink(missing_ok=True)
        return False
    return True


def _graph_to_cache(key: str, path: Path) -> None:
    """Keep a copy of the traced graph at ``path`` under ``key``; a cache that cannot be written only costs a
    later trace."""
    target = graph_cache_dir() / key
    if target.exists():
        return
    work = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
        files = _graph_files(path)
        for file in files:
            copy_file(file, work / file.name)
        (work / "hashes.json").write_text(json.dumps({f.name: sha256_file(work / f.name) for f in files}))
        os.replace(work, target)
    except OSError:
        pass
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _serve_from_cache(key: str, out: Path, progress: Progress) -> bool:
    if (out / MANIFEST).is_file():
        try:
            manifest = read_manifest(out)
            if manifest.get("cache_key") == key:
                verify_files(out, manifest)
                progress(f"{out}: already holds this export (same checkpoint and options); nothing to do")
                return True
        except EdgeavError:
            pass
    cached = cache_dir() / key
    try:
        manifest = read_manifest(cached)
        verify_files(cached, manifest)
    except EdgeavError:
        return False
    work = None
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        _copy_engine(cached, manifest, work)
        _replace_dir(work, out)
    except OSError as e:
        raise OptionError(f"{out}: cannot write the engine there ({e.strerror}); pick a writable -o") from None
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    progress(f"{out}: served from the export cache ({cached})")
    return True


def _store_in_cache(key: str, out: Path) -> None:
    """Copy the engine into the cache (its own copy: an edit to the engine never reaches the cache); an entry
    that no longer verifies is replaced."""
    target = cache_dir() / key
    if target.exists():
        try:
            verify_files(target, read_manifest(target))
            return
        except EdgeavError:
            shutil.rmtree(target, ignore_errors=True)
    work = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
        _copy_engine(out, read_manifest(out), work)
        os.replace(work, target)
    except (OSError, EdgeavError):
        pass  # a cache that cannot be written only costs a re-export
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


# Linux's FICLONE ioctl: a copy-on-write clone of a whole file (btrfs, XFS, bcachefs; others refuse it).
_FICLONE = 0x40049409


def copy_file(source: Path, target: Path) -> None:
    """Copy ``source`` to a new ``target``: a reflink where the file system offers one, else the bytes.

    Never a hard link: engines served from the cache must not share their bytes with it, or one
    in-place edit would break every copy.
    """
    with open(source, "rb") as src, open(target, "xb") as dst:
        try:
            import fcntl

            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        except (ImportError, OSError):
            shutil.copyfileobj(src, dst, 1 << 20)
    shutil.copymode(source, target)


__all__ = ["PRECISIONS", "GraphWriter", "cache_dir", "checkpoint_digest", "copy_file", "export_engine",
           "graph_cache_dir", "heartbeat"]
