"""Export a checkpoint to an engine directory: ONNX graphs per component, quantized as asked.

    loaded = load_checkpoint("ckpt/")                   # or load_converted(DEMO_DIR)
    export_engine(loaded, "engine/", precision="int4")

Steps: each component is traced with ``torch.onnx.export(dynamo=True)`` from the
thin wrappers in :mod:`edgeav.export.graphs` (fp32, or fp16 inside with fp32
inputs and outputs); ``int8`` then quantizes the encoders and the mask decoder
statically (QDQ, per-channel weights, symmetric activations as TensorRT wants)
with calibration inputs from the demo world run through the reference; ``int4``
quantizes the LLM's weight MatMuls with onnxruntime's MatMulNBits, leaving the
I-LoRA (A, B and the router) in fp32. The files are written to a temporary
directory beside the target and moved into place only when complete; the
manifest records every file's hash, the source checkpoint's digest, the tools
and the fidelity receipt. An export whose inputs match one already in the cache
(``$EDGEAV_CACHE``, default ``~/.cache/edgeav``) is copied from there (a reflink where the file
system offers one, never a hard link).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgeav import __version__
from edgeav.systems.crab.checkpoints import LoadedCrab
from edgeav.engines.manifest import (
    PRECISIONS,
    check_export_options,
    read_manifest,
    sha256_file,
    verify_files,
    write_json_atomic,
)
from edgeav.engines.manifest_schema import ENGINE_FORMAT, ENGINE_FORMAT_VERSION, MANIFEST
from edgeav.errors import EdgeavError, OptionError
from edgeav.outputs import usual_folder_mode
from edgeav.systems.crab.evaluate import DEMO_TASKS
from edgeav.systems.crab.tasks import get_task
from edgeav.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from edgeav.export.graphs import SPECS, AudioGraph, GraphSpec, LLMGraph, MaskGraph, VisualGraph, kv_shape
from edgeav.models.llama import ILoRALinear

OPSET = 18
Progress = Callable[[str], None]


class Float16IO(nn.Module):
    """Runs ``inner`` in fp16 with fp32 inputs and outputs (the casts are part of the graph)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(inner).half()

    def forward(self, *args: torch.Tensor):
        outputs = self.inner(*(a.half() if a.is_floating_point() else a for a in args))
        return tuple(o.float() for o in outputs) if isinstance(outputs, tuple) else outputs.float()


def checkpoint_digest(loaded: LoadedCrab) -> str:
    """SHA-256 over the config, the tokenizer's files (its model and settings: ``legacy`` changes prompt ids) and
    every tensor of every weight variant (names, dtypes, shapes, bytes), whatever the file layout."""
    digest = hashlib.sha256()
    digest.update(json.dumps(loaded.config.to_dict(), sort_keys=True).encode())
    for name, data in sorted(loaded.tokenizer.files().items()):
        digest.update(f"tokenizer/{name}/{len(data)}".encode())
        digest.update(data)
    # The joint model's mask decoder is whichever variant ran last (mask weights live in the variants).
    joint = {k: v for k, v in loaded.variant("joint").state_dict().items() if not k.startswith("seg.")}
    states = {"joint": joint, **loaded.variants}
    for name in sorted(states):
        for key in sorted(states[name]):
            tensor = states[name][key].detach().cpu().contiguous()
            digest.update(f"{name}/{key}/{tensor.dtype}/{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def export_graph(module: nn.Module, spec: GraphSpec, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    """``module`` traced by the dynamo exporter with ``spec``'s names and named dynamic axes."""
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = tuple({axis: dims.setdefault(label, _dim(label)) for axis, label in spec.dynamic.get(name, {}).items()}
                           or None for name in spec.inputs)
    if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values()):
        dynamic_shapes = {"args": dynamic_shapes}  # Float16IO.forward(*args)
    # The exporter narrates every phase on stdout and logs optimizer notes; the caller reports progress.
    chatter = io.StringIO()
    with warnings.catch_warnings(), _quiet_loggers(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module.eval(), example, dynamo=True, input_names=list(spec.inputs),
                                        output_names=list(spec.outputs), dynamic_shapes=dynamic_shapes,
                                        opset_version=OPSET, verbose=False)
        except Exception as e:  # the exporter raises many types; keep the line that says what went wrong
            raise EdgeavError(f"torch.onnx.export failed for {path.stem}: {_summary(e)}") from e
    program.save(str(path))
    return path


def _summary(error: Exception) -> str:
    """The exporter's own summary of ``error`` (its messages put it under '## Exception summary')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        if after:
            return after[0]
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def _quiet_loggers():
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._export", "onnxscript", "onnx_ir",
                                                     "onnxruntime.quantization.matmul_nbits_quantizer", "root")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _dim(label: str) -> torch.export.Dim:
    # "past" may be 0 (prefill); every other axis has at least one element.
    return torch.export.Dim(label, min=0 if label == "past" else 1, max=1 << 16)


def _examples(loaded: LoadedCrab) -> dict[str, tuple[torch.Tensor, ...]]:
    cfg = loaded.config
    size = cfg.vision.image_size
    grid = size // cfg.vision.patch_size
    return {
        "visual": (torch.randn(2, 3, size, size),),
        "audio": (torch.randn(2, 98, 128),),
        "llm": (torch.randn(1, 3, cfg.llm.hidden_size), torch.zeros(kv_shape(loaded.model.llm, 5))),
        "mask": (torch.randn(1, cfg.seg.num_mask_tokens, cfg.llm.hidden_size),
                 torch.randn(1, cfg.vision.hidden_size, grid, grid), torch.randn(1, cfg.vision.hidden_size, grid, grid)),
    }


def _merge_lora(llm: nn.Module) -> tuple[nn.Module, float]:
    """A copy of ``llm`` whose I-LoRA layers are plain linears with the heads mixed uniformly.

    Lossy by design (the router mixes per token); the receipt reports how lossy.
    Returns the copy and the largest relative weight change.
    """
    merged = copy.deepcopy(llm)
    worst = 0.0
    for parent in list(merged.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, ILoRALinear):
                mix = torch.full((child.heads,), 1.0 / child.heads)
                weight = child.merged_weight(mix)
                worst = max(worst, float((weight - child.weight).norm() / child.weight.norm().clamp_min(1e-12)))
                linear = nn.Linear(child.in_features, child.out_features, bias=False)
                linear.weight = nn.Parameter(weight)
                setattr(parent, child_name, linear)
    return merged, worst


def _llm_keys(loaded: LoadedCrab) -> dict[str, tuple[str, str]]:
    """variant -> (LLM graph name, embedding table name); variants with the joint tensors share its files."""
    joint = loaded.variant("joint").llm
    head, embed = joint.lm_head.weight.detach().clone(), joint.model.embed_tokens.weight.detach().clone()
    out = {"joint": ("llm", "embed_joint")}
    for name, tensors in loaded.variants.items():
        same_head = torch.equal(tensors["lm_head.weight"], head)
        same_embed = torch.equal(tensors["model.embed_tokens.weight"], embed)
        out[name] = ("llm" if same_head else f"llm_{name}", "embed_joint" if same_embed else f"embed_{name}")
    return out


def export_engine(
    loaded: LoadedCrab,
    out: str | Path,
    *,
    fmt: str = "onnx",
    precision: str = "fp32",
    block_size: int = 32,
    calibration: str = "demo",
    merge_lora: bool = False,
    receipt_n: int = 4,
    variants: tuple[str, ...] | None = None,
    use_cache: bool = True,
    progress: Progress = lambda message: None,
) -> Path:
    """Export ``loaded`` to the engine directory ``out`` and return it (see the module docstring).

    ``variants``: the weight variants to include ("joint" always; default every one the
    checkpoint has). An engine without "avs"/"avss" refuses the mask tasks.
    """
    row = check_export_options(fmt, precision, block_size)
    available = ("joint", *loaded.variants)
    variants = available if variants is None else tuple(dict.fromkeys(("joint", *variants)))
    missing = [v for v in variants if v not in available]
    if missing:
        raise OptionError(f"variant {missing[0]!r}: the checkpoint has {', '.join(available)}")
    if fmt == "tensorrt":
        from edgeav.export.tensorrt import import_tensorrt

        import_tensorrt()  # fail before minutes of exporting, not after
    if calibration != "demo":
        raise OptionError(f"--calibration {calibration!r}: expected demo (the synthetic world)")
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
    options = {"format": fmt, "precision": precision, "block_size": block_size if row.components["llm"] == "int4"
               else None, "calibration": calibration, "merge_lora": merge_lora, "receipt_n": receipt_n,
               "variants": list(variants)}
    cache_key = hashlib.sha256(json.dumps({"source": source_digest, "options": options, "edgeav": __version__,
                                           "torch": torch.__version__}, sort_keys=True).encode()).hexdigest()[:32]
    if use_cache and _serve_from_cache(cache_key, out, progress):
        return out

    try:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise OptionError(f"{out.parent}: cannot write there ({e.strerror}); pick a writable -o") from None
    try:
        manifest = _build(loaded, work, row, fmt, block_size, merge_lora, variants, progress)
        manifest.update({"cache_key": cache_key, "options": options,
                         "source": {"checkpoint": loaded.source, "digest": source_digest}})
        write_json_atomic(work / MANIFEST, manifest)
        if receipt_n and fmt == "tensorrt":
            manifest["receipt"] = {"skipped": "TensorRT engines have no runtime backend in edgeav yet, so the "
                                              "receipt comes from the onnx export of the same precision"}
            write_json_atomic(work / MANIFEST, manifest)
        elif receipt_n:
            from edgeav.export.receipt import fidelity_receipt

            progress(f"receipt: comparing with the PyTorch reference on {receipt_n} demo clips per task")
            tasks = tuple(t for t in DEMO_TASKS if get_task(t).weights in variants)
            manifest["receipt"] = fidelity_receipt(loaded, work, n=receipt_n, tasks=tasks, progress=progress)
            write_json_atomic(work / MANIFEST, manifest)
        _replace_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if use_cache:
        _store_in_cache(cache_key, out)
    return out


def _build(loaded: LoadedCrab, work: Path, row, fmt: str, block_size: int, merge_lora: bool,
           variants: tuple[str, ...], progress: Progress) -> dict:
    examples = _examples(loaded)
    graphs: dict[str, dict] = {}
    model = loaded.variant("joint")
    fp32 = work / "fp32"
    fp32.mkdir()
    calibration_traces: dict = {}

    def emit(name: str, kind: str, module: nn.Module) -> None:
        component_precision = row.components[kind]
        start = time.perf_counter()
        wrapped = Float16IO(module) if component_precision == "fp16" else module
        path = export_graph(wrapped, SPECS[kind], examples[kind], fp32 / f"{name}.onnx")
        final = work / f"{name}.onnx"
        if component_precision == "int8":
            from edgeav.export.quantize import quantize_int8

            with _quiet_loggers():
                quantize_int8(path, final, name, loaded, calibration_traces)
        elif component_precision == "int4":
            from edgeav.export.quantize import quantize_int4

            with _quiet_loggers():
                quantize_int4(path, final, block_size, module)
        else:
            _move_model(path, final)
        graphs[name] = {"file": final.name, "component": kind, "precision": component_precision}
        progress(f"{name}: {component_precision}, {final.stat().st_size / 1e6:.1f} MB "
                 f"in {time.perf_counter() - start:.0f} s")

    with torch.no_grad():
        emit("visual", "visual", VisualGraph(model))
        emit("audio", "audio", AudioGraph(model))
    keys = {name: files for name, files in _llm_keys(loaded).items() if name in variants}
    entries: dict[str, dict] = {}
    merge_error = None
    for variant, (llm_name, embed_name) in keys.items():
        model = loaded.variant(variant)
        if llm_name not in graphs:
            llm = model.llm
            if merge_lora:
                llm, merge_error = _merge_lora(llm)
            emit(llm_name, "llm", LLMGraph(llm))
        if not (work / f"{embed_name}.npy").exists():
            np.save(work / f"{embed_name}.npy", model.llm.model.embed_tokens.weight.detach().float().numpy())
        entry = {"llm": llm_name, "embed": f"{embed_name}.npy"}
        if variant != "joint":
            emit(f"mask_{variant}", "mask", MaskGraph(model.seg))
            entry["mask"] = f"mask_{variant}"
        entries[variant] = entry
    loaded.variant("joint")
    shutil.rmtree(fp32)
    loaded.tokenizer.save(work)  # tokenizer.model and tokenizer_config.json (legacy changes prompt ids)
    if fmt == "tensorrt":
        from edgeav.export.tensorrt import build_engines

        graphs = build_engines(work, graphs, loaded.config, row.name, progress)
    files = {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.is_file() and p.name != MANIFEST}
    return {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "backend": fmt,
        "precision": row.name,
        "components": row.components,
        "config": loaded.config.to_dict(),
        "graphs": graphs,
        "variants": entries,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_config": TOKENIZER_CONFIG_FILE,
        "lora": {"merged": merge_lora, "mix": "uniform" if merge_lora else "routed per token (exact)",
                 "max_relative_weight_change": merge_error},
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

    return {"edgeav": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


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


__all__ = ["PRECISIONS", "cache_dir", "checkpoint_digest", "copy_file", "export_engine", "export_graph"]
