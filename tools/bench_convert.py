"""Peak memory of streamed HF conversion on an 8B-shaped Llama (docs/benchmarks.md).

Writes random bf16 weights of Llama 3.1 8B's shape (width 4096, MLP 14336, vocab 128256, GQA 32/8;
``--layers`` of its 32 layers) as sharded safetensors with ``model.safetensors.index.json``,
then runs ``evoformer import-hf`` and ``evoformer export-hf`` each in a fresh subprocess and
reports each one's peak resident memory (``VmHWM``) against the largest shard and the
model, plus the resident memory of a process that only imports the same modules.

    python tools/bench_convert.py [--layers 4] [--shard-size 2GB] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evoformer.checkpoint.hf.stream import TensorInfo, parse_size, write_sharded  # noqa: E402

D, FFN, VOCAB, HEADS, KV = 4096, 14336, 128256, 32, 8


def llama_config(layers: int) -> dict:
    """meta-llama/Llama-3.1-8B's config.json with fewer layers."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": D,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": layers,
        "num_key_value_heads": KV,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": VOCAB,
    }


def llama_tensors(layers: int) -> list[tuple[str, TensorInfo]]:
    kv = D // HEADS * KV
    out = [("model.embed_tokens.weight", (VOCAB, D))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (D,)),
            (p + "self_attn.q_proj.weight", (D, D)),
            (p + "self_attn.k_proj.weight", (kv, D)),
            (p + "self_attn.v_proj.weight", (kv, D)),
            (p + "self_attn.o_proj.weight", (D, D)),
            (p + "post_attention_layernorm.weight", (D,)),
            (p + "mlp.gate_proj.weight", (FFN, D)),
            (p + "mlp.up_proj.weight", (FFN, D)),
            (p + "mlp.down_proj.weight", (D, FFN)),
        ]
    out += [("model.norm.weight", (D,)), ("lm_head.weight", (VOCAB, D))]
    return [(n, TensorInfo(torch.bfloat16, s)) for n, s in out]


def write_model(folder: Path, layers: int, shard_bytes: int) -> list[Path]:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(llama_config(layers), indent=2))
    tensors = llama_tensors(layers)
    infos = dict(tensors)
    gen = torch.Generator().manual_seed(0)

    def produce(name: str) -> torch.Tensor:
        t = torch.empty(infos[name].shape, dtype=torch.float32)
        return t.normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)

    return write_sharded(folder, tensors, produce, shard_bytes)


CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from evoformer.cli import import_hf_main, export_hf_main
import evoformer.checkpoint.hf.convert  # the baseline: Python, torch and the converter loaded
t = time.perf_counter()
rc = {{"import": import_hf_main, "export": export_hf_main, "baseline": lambda a: 0}}[sys.argv[1]](
    sys.argv[2:])
# VmHWM: this process image's peak RSS (ru_maxrss would include the parent's, via fork)
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print("RESULT", rc, hwm * 1024, time.perf_counter() - t)
"""


def run_child(what: str, *args: str) -> tuple[int, float]:
    """Peak RSS (bytes) and seconds of one conversion in a fresh process."""
    code = CHILD.format(root=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code, what, *args], capture_output=True, text=True, check=False
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None or line.split()[1] != "0":
        raise SystemExit(f"{what} failed:\n{out.stdout}\n{out.stderr}")
    _, _, rss, secs = line.split()
    return int(rss), float(secs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shard-size", default="2GB", help="input and export shard limit")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp)")
    ns = ap.parse_args()
    work = ns.work or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    shard = parse_size(ns.shard_size)
    try:
        t = time.perf_counter()
        shards = write_model(work / "hf", ns.layers, shard)
        print(f"wrote {len(shards)} shards in {time.perf_counter() - t:.0f} s")
        model_bytes = sum(p.stat().st_size for p in shards)
        largest = max(p.stat().st_size for p in shards)
        base, _ = run_child("baseline")
        imp, t_imp = run_child("import", str(work / "hf"), str(work / "ours"))
        exp, t_exp = run_child(
            "export", str(work / "ours"), str(work / "back"), "--max-shard-size", ns.shard_size
        )
        out_largest = max(p.stat().st_size for p in (work / "back").glob("*.safetensors"))
        gib = 2**30
        print(
            f"model: {ns.layers} layers, {model_bytes / gib:.2f} GiB bf16 in {len(shards)} shards"
        )
        print(
            f"largest input shard {largest / gib:.2f} GiB, largest export shard "
            f"{out_largest / gib:.2f} GiB; process baseline {base / gib:.2f} GiB"
        )
        for what, rss, secs, ref in (
            ("import", imp, t_imp, largest),
            ("export", exp, t_exp, out_largest),
        ):
            print(
                f"{what}: peak RSS {rss / gib:.2f} GiB = {rss / ref:.2f} x largest shard, "
                f"{rss / model_bytes:.2f} x model, {secs:.0f} s"
            )
        print(
            f"peak RSS - baseline: import {(imp - base) / gib:.2f} GiB, export "
            f"{(exp - base) / gib:.2f} GiB; maxrss of this process "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
        )
    finally:
        if ns.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
