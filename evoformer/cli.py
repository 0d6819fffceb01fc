"""`evoformer` command line: parse, build, hand off. Also `python -m evoformer`.

Every mistake a user can make ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evoformer.errors import HANG_EXIT, JobHung, UserError, report_user_error

if TYPE_CHECKING:  # the HF package pulls in torch; the commands import it when they run
    from evoformer.checkpoint.hf import Conversion

USAGE = """usage: evoformer <command> [args]

commands:
  train [CONFIG.yaml ...] [key=value ...]   train (no file: configs/quickstart.yaml)
  config [CONFIG.yaml ...] [key=value ...]  print the resolved config (--help: every key)
  generate CKPT --prompt TEXT               sample text from a checkpoint
  inspect [CONFIG.yaml ...] [key=value ...] parameter counts of a model config
  plan [CONFIG.yaml ...] [key=value ...] --gpus N   per-rank memory estimate of a layout
  (train, config, inspect and plan with no file read configs/quickstart.yaml)
  tokenizer train [FILES ...] --out PREFIX  train a sentencepiece BPE tokenizer
  preprocess INPUTS ... --tokenizer T --out DIR    tokenise txt/jsonl(.gz/.zst)/parquet into a
                                            sharded token store (--merge: join slices)
  import-hf HF_DIR OUT_DIR                  HuggingFace folder -> evoformer checkpoint
  export-hf CKPT_DIR OUT_DIR                evoformer checkpoint -> HuggingFace folder
  plot RUN_DIR [RUN_DIR ...] [--out F.png]  loss, lr, grad norm, tokens/s, MFU of runs (PNG)

`evoformer train --help` lists every config key with its default and meaning."""

# The shipped configs live in the package (evoformer/configs/, package data), so `configs/...`
# names them in a checkout (where ./configs links there) and in a plain `pip install` alike.
PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = "configs/quickstart.yaml"


def find_config(name: str) -> str:
    """A config path as given, else one of the shipped configs (``configs/...``)."""
    p = Path(name)
    if p.exists() or p.is_absolute():
        return str(p)
    candidate = PACKAGE_DIR / name
    return str(candidate) if candidate.exists() else str(p)


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(config files, key=value overrides); no file means the quickstart config, so that
    ``train``, ``config``, ``inspect`` and ``plan`` with no file all describe the same run."""
    files = [find_config(a) for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    return files or [find_config(DEFAULT_CONFIG)], overrides


def sizing_overrides(files: list[str], overrides: list[str]) -> tuple[list[str], str]:
    """What ``inspect`` and ``plan`` size a model at when the config does not say: the model's
    own context length (``model.max_seq_len``) and bf16, not the training defaults (256 tokens,
    fp32) that suit a CPU test run. Returns the extra overrides and a line saying so."""
    from omegaconf import OmegaConf

    given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    for f in files:
        try:
            tree = OmegaConf.load(f)
        except Exception:  # load_config reports a bad file with its own line
            continue
        for key in ("train.seq_len", "precision"):
            if OmegaConf.select(tree, key) is not None:
                given.add(key)
    extra, said = [], []
    if "train.seq_len" not in given:
        extra.append("train.seq_len=${model.max_seq_len}")
        said.append("seq_len = model.max_seq_len")
    if "precision" not in given:
        extra.append("precision=bf16")
        said.append("bf16")
    note = f"sized at {' in '.join(said)} (set train.seq_len / precision to change)" if said else ""
    return extra, note


def _wants_help(argv: list[str]) -> bool:
    return "-h" in argv or "--help" in argv


def _config_help(command: str, what: str) -> str:
    from evoformer.config import config_help

    return (
        f"usage: evoformer {command} [CONFIG.yaml ...] [key=value ...]\n\n{what}\n"
        f"No file: {DEFAULT_CONFIG}. YAML files merge left to right, then key=value "
        "overrides. Keys:\n" + config_help()
    )


def cmd_train(argv: list[str]) -> int:
    if _wants_help(argv):
        print(_config_help("train", "Train a model."))
        return 0
    from evoformer.config import load_config
    from evoformer.engine import Trainer

    files, overrides = split_args(argv)
    cfg = load_config(files, overrides)
    result = Trainer(cfg).train()
    if result.interrupted:
        return 0
    return 0


def cmd_config(argv: list[str]) -> int:
    if _wants_help(argv):
        print(_config_help("config", "Print the resolved config as YAML."))
        return 0
    from evoformer.config import load_config, to_yaml

    files, overrides = split_args(argv)
    print(to_yaml(load_config(files, overrides)), end="")
    return 0


def cmd_inspect(argv: list[str]) -> int:
    if _wants_help(argv):
        print(_config_help("inspect", "Parameter counts, FLOPs and KV-cache size of the model."))
        return 0
    from evoformer.config import load_config
    from evoformer.planning import describe

    files, overrides = split_args(argv)
    extra, note = sizing_overrides(files, overrides)
    if note:
        print(note)
    print(describe(load_config(files, [*extra, *overrides])))
    return 0


def cmd_plan(argv: list[str]) -> int:
    from evoformer.config import load_config
    from evoformer.planning.memory import estimate, fit_verdict, format_plan, parse_size

    gpus, gpu_mem = 1, None
    rest = []
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            print(
                "usage: evoformer plan [CONFIG.yaml ...] [key=value ...] --gpus N "
                "[--gpu-mem 80GB]\n\n"
                "Per-rank memory estimate of the config's layout on N GPUs (default 1); no "
                f"file: {DEFAULT_CONFIG}. --gpu-mem: say whether the busiest rank fits in that "
                "much memory (binary units: 80GB = 80 GiB) and the largest micro-batch that "
                "does. `evoformer train --help` lists the keys."
            )
            return 0
        if arg == "--gpus" or arg.startswith("--gpus="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"--gpus must be a positive integer, got {value!r}")
            gpus = int(value)
        elif arg == "--gpu-mem" or arg.startswith("--gpu-mem="):
            gpu_mem = parse_size(arg.split("=", 1)[1] if "=" in arg else next(it, ""))
        else:
            rest.append(arg)
    files, overrides = split_args(rest)
    extra, note = sizing_overrides(files, overrides)
    if note:
        print(note)
    cfg = load_config(files, [*extra, *overrides])
    plan = estimate(cfg, gpus)
    print(format_plan(cfg, plan))
    if gpu_mem is not None:
        print("\n".join(fit_verdict(cfg, plan, gpus, gpu_mem)))
    return 0


def cmd_generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="evoformer generate",
        description="Sample text from a checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="run folder, checkpoints folder or step folder")
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--no-cache", action="store_true", help="recompute without a KV cache")
    parser.add_argument(
        "--tokenizer",
        help="sentencepiece .model, HF tokenizer.json or HF folder (default: the checkpoint's)",
    )
    args = parser.parse_args(argv)

    from evoformer.checkpoint import load_model, resolve_checkpoint
    from evoformer.checkpoint.tokenizer import checkpoint_tokenizer
    from evoformer.model.generate import generate

    ckpt = resolve_checkpoint(args.checkpoint)
    tokenizer = checkpoint_tokenizer(ckpt, args.tokenizer)
    model = load_model(ckpt)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise UserError("--prompt encodes to no tokens")
    new = generate(
        model,
        prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        use_cache=not args.no_cache,
        stop_id=tokenizer.eod_id,
        seed=args.seed,
    )
    print(args.prompt + tokenizer.decode([t for t in new if t != tokenizer.eod_id]))
    return 0


TOKENIZER_USAGE = "usage: evoformer tokenizer train [FILES ...] --out PREFIX --vocab-size N"


def cmd_tokenizer(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(TOKENIZER_USAGE + "\n\n`evoformer tokenizer train --help` describes the options.")
        return 0
    if not argv or argv[0] != "train":
        raise UserError(TOKENIZER_USAGE)
    from evoformer.data.commands import tokenizer_train_main

    return tokenizer_train_main(argv[1:])


def cmd_preprocess(argv: list[str]) -> int:
    from evoformer.data.commands import preprocess_main

    return preprocess_main(argv)


def _report(prog: str, convert: Callable[[], Conversion], verb: str) -> int:
    try:
        out, family, n_params, notes = convert()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"{verb} {family.name} model ({n_params:,} parameters) -> {out}")
    for note in notes:
        print(f"  {family.name}: {note}")
    return 0


def import_hf_main(argv: Sequence[str] | None = None) -> int:
    """``evoformer import-hf HF_DIR OUT_DIR``; returns the exit status."""
    from evoformer.checkpoint.hf import FAMILIES, convert_from_hf

    prog = "evoformer import-hf"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a HuggingFace save_pretrained folder (safetensors) into an evoformer "
        f"run folder with a step_0 checkpoint. Families: {', '.join(FAMILIES)}.",
    )
    parser.add_argument("hf_dir", type=Path, help="folder with config.json and model.safetensors")
    parser.add_argument(
        "out_dir", type=Path, help="run folder to create (config.yaml, checkpoints/)"
    )
    ns = parser.parse_args(argv)
    return _report(prog, lambda: convert_from_hf(ns.hf_dir, ns.out_dir), "imported")


def export_hf_main(argv: Sequence[str] | None = None) -> int:
    """``evoformer export-hf CKPT_DIR OUT_DIR [--family NAME] [--max-shard-size SIZE]``;
    returns the exit status."""
    from evoformer.checkpoint.hf import FAMILIES, convert_to_hf
    from evoformer.checkpoint.hf.stream import parse_size

    prog = "evoformer export-hf"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write an evoformer checkpoint as a HuggingFace folder (config.json + "
        "safetensors, sharded with an index past --max-shard-size) that "
        "AutoModelForCausalLM.from_pretrained loads; tensors are streamed one at a time.",
    )
    parser.add_argument(
        "ckpt_dir", help="checkpoint step folder, checkpoints/ folder or run folder"
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the HF files into")
    parser.add_argument("--family", choices=list(FAMILIES), help="HF architecture (default: auto)")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB, as save_pretrained); "
        "a larger model is written as shards with model.safetensors.index.json",
    )
    ns = parser.parse_args(argv)

    def run() -> Conversion:
        size = parse_size(ns.max_shard_size)
        return convert_to_hf(ns.ckpt_dir, ns.out_dir, ns.family, size)

    return _report(prog, run, "exported")


def cmd_plot(argv: list[str]) -> int:
    from evoformer.plot import main as plot_main

    return plot_main(argv)


COMMANDS = {
    "train": cmd_train,
    "config": cmd_config,
    "inspect": cmd_inspect,
    "plan": cmd_plan,
    "generate": cmd_generate,
    "tokenizer": cmd_tokenizer,
    "preprocess": cmd_preprocess,
    "import-hf": import_hf_main,
    "export-hf": export_hf_main,
    "plot": cmd_plot,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command '{argv[0]}' (see `evoformer --help`)", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except JobHung as err:
        report_user_error(err)
        return HANG_EXIT
    except UserError as err:
        return report_user_error(err)  # once per job under torchrun: from rank 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
