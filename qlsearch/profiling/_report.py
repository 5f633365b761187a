"""A profile as text: a terminal table, a Markdown table, and files a person can open."""

from __future__ import annotations

import json
from pathlib import Path

from qlsearch.adapters import advantages
from qlsearch.profiling._benchmark import MethodProfile, ProfileResult
from qlsearch.profiling._machine import machine_tag
from qlsearch.profiling._settings import SYNTHETIC_MODELS

_HEADERS = ("method", "form", "weights/compute", "forward ms [min-max]", "overhead ms", "fwd x LoRA",
            "fwd x frozen", "prefill ms", "decode tok/s", "dec x LoRA", "dec x frozen", "train ms",
            "train x LoRA", "GFLOPs", "FLOPs x LoRA", "FLOPs x frozen", "kernels fwd", "kern x LoRA",
            "kernels train", "kern train x LoRA", "trainable", "total", "peak MiB", "peak x LoRA")


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _short(dtype: str) -> str:
    return dtype.replace("float", "fp").replace("bfp", "bf")


def _row(name: str, m: MethodProfile) -> list[str]:
    spread = m.forward_ms_spread
    dtypes = "-" if m.adapter_dtype is None else f"{_short(m.adapter_dtype)}/{_short(m.compute_dtype)}"
    return [
        name,
        m.form,
        dtypes,
        f"{m.forward_ms:,.2f} [{spread['min']:,.2f}-{spread['max']:,.2f}]",
        f"{m.overhead_ms:+,.2f}",
        _num(m.forward_ratio, 3),
        _num(m.forward_ratio_frozen, 3),
        _num(m.prefill_ms),
        _num(m.decode_tokens_per_s, 1),
        _num(m.decode_ratio, 3),
        _num(m.decode_ratio_frozen, 3),
        _num(m.train_step_ms),
        _num(m.train_ratio, 3),
        "-" if m.flops is None else f"{m.flops / 1e9:,.3f}",
        _num(m.flops_ratio, 4),
        _num(m.flops_ratio_frozen, 4),
        "-" if m.kernels is None else f"{m.kernels:,}",
        _num(m.kernels_ratio, 3),
        "-" if m.train_kernels is None else f"{m.train_kernels:,}",
        _num(m.train_kernels_ratio, 3),
        f"{m.trainable_params:,}",
        f"{m.total_params:,}",
        "-" if m.peak_memory_bytes is None else f"{m.peak_memory_bytes / 2**20:,.1f}",
        _num(m.peak_memory_ratio, 3),
    ]


def _caption(result: ProfileResult) -> str:
    s, mc, machine = result.settings, result.settings["model_config"], result.machine
    threads = machine["torch_threads"]
    where = (machine["gpu"]["name"] if machine["gpu"]
             else f"{machine['cpu']}, {threads} thread{'s' if threads != 1 else ''}")
    synthetic = s["model"] in SYNTHETIC_MODELS  # no tokens, no decoding
    shape = f"batch {s['batch']}" if synthetic else f"batch {s['batch']} x seq {s['seq']}"
    static = (s.get("decode_cache") or "").startswith("static")  # older results files lack it
    decode = "" if synthetic else f", decode {s['new_tokens']} tokens" + (" (static cache)" if static else "")
    return (f"{s['model']} ({mc['model_type']}, {mc['num_hidden_layers']} layers, hidden {mc['hidden_size']}), "
            f"{shape}, {s['dtype']} on {where}, torch {machine['torch']}; "
            f"precision {s['precision']}, "
            f"median of {s['repeats']} after {s['warmup']} warm-up{decode}"
            f"{', compiled' if s['compile'] else ''}")


def format_table(result: ProfileResult) -> str:
    """A fixed-width table for the terminal, with the settings in one line above it."""
    rows = [list(_HEADERS)] + [_row(name, m) for name, m in result.methods.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    lines = [_caption(result)]
    for j, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(result: ProfileResult) -> str:
    """The same table in Markdown, with its settings as a caption."""
    lines = [f"**{_caption(result)}**", "", "| " + " | ".join(_HEADERS) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(_HEADERS) - 1)) + "|"]
    lines += ["| " + " | ".join(_row(name, m)) + " |" for name, m in result.methods.items()]
    lines += [""] + [f"Implementation, {name}: {text}." for name, text in
                     advantages(n.partition("@")[0] for n in result.methods).items()]
    compiled = [f"{name} {m.forward_compile_s:.1f} s" + "".join(
                    f" ({what} {seconds:.1f} s)" for what, seconds in (
                        ("training step", m.train_compile_s), ("generate", m.decode_compile_s)) if seconds is not None)
                for name, m in result.methods.items() if m.forward_compile_s is not None]
    if compiled:
        lines.append("Compiling, the first forward of each model (warm-up, not timed): " + ", ".join(compiled) + ".")
    lines += [f"Peak memory: {result.settings['peak_memory']}.",
              f"Timer: {result.settings['timer']}. Ratios are to PEFT LoRA, overhead to the frozen model, "
              "measured in the same process."]
    return "\n".join(lines) + "\n"


def write_results(result: ProfileResult, out_dir: str | Path, tag: str | None = None) -> tuple[Path, Path]:
    """``<out_dir>/<tag>.json`` and ``<tag>.md``; ``tag`` defaults to the machine's (e.g. ``cpu-amd-epyc-2t``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = tag or machine_tag(result.machine)
    json_path, md_path = out_dir / f"{tag}.json", out_dir / f"{tag}.md"
    json_path.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    md_path.write_text(format_markdown(result))
    return json_path, md_path
