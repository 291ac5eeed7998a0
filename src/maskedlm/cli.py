"""The `maskedlm` command line: parses arguments and dispatches to the Python API; no logic lives here.

Each subcommand imports its module inside its function (torch stays off the import path: `--help` is fast) and calls
one function. A UserError becomes a one-line `maskedlm: error: ...` on stderr and exit 2. In train a first Ctrl-C or
SIGTERM saves a checkpoint and exits 0 (the run is resumable); a second Ctrl-C, or one in any other command, exits 130."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from maskedlm.errors import UserError


def _tokenizer_train(a):
    from maskedlm.tokenizer import train_tokenizer

    path = train_tokenizer(
        inputs=a.input, vocab_size=a.vocab_size, kind=a.kind, out=a.out, lowercase=a.lowercase,
        input_format=a.format, text_field=a.text_field, overwrite=a.overwrite,
    )
    print(f"wrote {path}")


def _prepare(a):
    from maskedlm.data.prepare import merge, prepare

    if a.merge:
        if a.input or a.tokenizer or a.out or a.shard:
            raise UserError("--merge OUT PART_DIR... takes no --input, --tokenizer, --out or --shard")
        merge(a.merge[1:], a.merge[0], overwrite=a.overwrite)
        return
    if not (a.input and a.tokenizer and a.out):
        raise UserError("prepare needs --input, --tokenizer and --out (or --merge OUT PART_DIR...)")
    options = dict(val_fraction=a.val_fraction, input_format=a.format, text_field=a.text_field, doc_per=a.doc_per,
                   workers=a.workers, seed=a.seed)
    # Started by torchrun with several processes: every rank prepares a part, rank 0 merges them. Read from the
    # environment here, since importing torch (distributed.py) would add ~225 MB of RSS to every plain prepare.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if a.shard:
            raise UserError("--shard and torchrun both split the input; use one of them")
        from maskedlm import distributed as dist
        from maskedlm.data.distprepare import prepare_distributed

        prepare_distributed(a.input, a.tokenizer, a.seq_len, a.out, overwrite=a.overwrite, **options)
        dist.end_process(0)  # no interpreter finalization, where gloo's threads can abort the process
        return
    prepare(inputs=a.input, tokenizer=a.tokenizer, seq_len=a.seq_len, out=a.out, overwrite=a.overwrite,
            shard=a.shard, **options)


def _train(a):
    from maskedlm import distributed as dist
    from maskedlm.train import train

    train(config=a.config, data=a.data, out=a.out, overrides=a.overrides, resume=a.resume, init_from=a.init_from)
    dist.end_process(0)  # under torchrun: no interpreter finalization, where gloo's threads can abort the process


def _eval(a):
    from maskedlm import distributed as dist
    from maskedlm.evaluate import evaluate_model

    result = evaluate_model(a.model, data=a.data, split=a.split, overrides=a.overrides)
    dist.print0(json.dumps(result, indent=2))  # under torchrun every rank has the same numbers; one prints them
    dist.end_process(0)  # under torchrun: no interpreter finalization, where gloo's threads can abort the process


def _text(text: str) -> str:
    """TEXT as the shell passed it, or standard input for `-` (a text longer than the OS's argument limit). Bytes
    that are not UTF-8 (lone surrogates in argv) become U+FFFD, as prepare reads a corpus, and the user is told."""
    raw = sys.stdin.buffer.read() if text == "-" else text.encode("utf-8", "surrogateescape")
    clean = raw.decode("utf-8", "replace")
    text = text if text != "-" else raw.decode("utf-8", "surrogateescape")
    if clean != text:
        print("maskedlm: note: TEXT is not valid UTF-8; the bad bytes were read as U+FFFD", file=sys.stderr)
    return clean


def _fill(a):
    from maskedlm.inference import fill, format_fill

    result = fill(a.model, _text(a.text), top_k=a.top_k)
    print(json.dumps(result, indent=2) if a.json else format_fill(result))


def _explain(a):
    from maskedlm.inference import explain, format_explain
    from maskedlm.models import load_any_model

    loaded = load_any_model(a.model)
    result = explain(loaded, _text(a.text), mask=a.mask, seed=a.seed)
    print(json.dumps(result, indent=2) if a.json else format_explain(result, tokenizer=loaded[2]))


def _score(a):
    from maskedlm.inference import score

    print(json.dumps(score(a.model, _text(a.text)), indent=2))


def _demo(a):
    from maskedlm.demo import run_demo

    run_demo(minutes=a.minutes, quick=a.quick, out=a.out)


def _export(a):
    from maskedlm.interop import export

    print(export(a.model, out=a.out, overwrite=a.overwrite)["report"])


def _import(a):
    from maskedlm.interop import import_checkpoint

    print(import_checkpoint(a.hf_dir, out=a.out, overwrite=a.overwrite)["report"])


def _finetune(a):
    from maskedlm import distributed as dist
    from maskedlm.finetune import finetune

    if a.suite:
        return _suite(a)
    if not (a.train and a.eval):
        raise UserError("finetune needs --train FILE and --eval FILE (or --suite SUITE.toml)")
    result = finetune(a.model, train=a.train, eval=a.eval, out=a.out, task=a.task, test=a.test,
                      text_field=a.text_field, pair_field=a.text_pair_field, label_field=a.label_field,
                      seeds=a.seeds, probe=a.probe, overrides=a.overrides, overwrite=a.overwrite)
    dist.print0(json.dumps(result, indent=2))  # under torchrun every rank has the same numbers; one prints them
    dist.end_process(0)  # under torchrun: no interpreter finalization, where gloo's threads can abort the process


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as the one line every other bad input gets (its default prints the usage first)."""

    def error(self, message):
        print(f"maskedlm: error: {self.prog.removeprefix('maskedlm ')}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class _Repeatable(argparse.Action):
    """An option given once is its value; given again, the list of its values (`--data A --data B`: a mixture)."""

    def __call__(self, parser, namespace, values, option_string=None):
        have = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, values if have is None else [*(have if isinstance(have, list) else [have]), values])


class _IntermixedParser(_Parser):
    """`maskedlm train --data D a.b=1 --out R c.d=2`: overrides may come before, between or after options (argparse alone stops
    collecting positionals at the first option, bpo-14191)."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _suite(a):
    from maskedlm.suite import markdown, run_suite

    given = [o for o, v in (("--train", a.train), ("--eval", a.eval), ("--test", a.test), ("--probe", a.probe),
                            ("--task", a.task != "classify")) if v]
    if given:
        raise UserError(f"{given[0]} does not go with --suite: the suite file names each task's files and kind")
    tab = run_suite(a.model, a.suite, a.out, seeds=a.seeds, overrides=a.overrides, overwrite=a.overwrite,
                    log=lambda m: print(m, file=sys.stderr))
    print(markdown(tab) + f"\nwrote {tab['out']}/suite.md and suite.json; each task's output in {tab['out']}/<name>/")


def _report(a):
    from maskedlm.report import write_report
    from maskedlm.suite import is_suite_dir, show_suite

    if any(is_suite_dir(r) for r in a.runs):  # a suite's DIR: its table, not run curves
        if len(a.runs) > 1:
            raise UserError("report takes one suite DIR at a time (its table), not beside run dirs")
        print(show_suite(a.runs[0]), end="")
        return
    print(f"wrote {write_report(a.runs, data=a.data, out=a.out, png=a.png)}")


def _masks(a):
    from maskedlm.masks import masks_report

    print(masks_report(a.data, config=a.config, overrides=a.overrides, rows=a.rows, as_json=a.json, split=a.split,
                       step=a.step, epoch=a.epoch, max_rows=a.max_rows))


def _add_tokenizer(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train a tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tok_sub.add_parser("train", help="train a WordPiece, BPE or Unigram tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, directories (recursive) or globs: text, JSON Lines, .gz/.zst, Parquet, datasets save_to_disk dirs")
    t.add_argument("--vocab-size", type=int, default=30522)
    t.add_argument("--kind", choices=["wordpiece", "bpe", "unigram"], default="wordpiece")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--lowercase", action="store_true")
    t.add_argument("--format", choices=["text", "jsonl"], default=None, help="default: jsonl for *.jsonl[.gz], else text")
    t.add_argument("--text-field", default="text")
    t.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    t.set_defaults(fn=_tokenizer_train)


def _add_prepare(sub) -> None:
    t = sub.add_parser("prepare", help="tokenize a corpus into packed rows (train/ and val/ shards + meta.json)")
    t.add_argument("--input", nargs="+", metavar="PATH",
                   help="files, directories, globs: text, JSON Lines, .gz/.zst, Parquet, datasets save_to_disk dirs")
    t.add_argument("--tokenizer", metavar="DIR", help="a maskedlm or Hugging Face tokenizer directory, or a tokenizer.json")
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--out", metavar="DATA_DIR")
    t.add_argument("--shard", default=None, metavar="I/N", help="prepare only part I of N of the input files (join with --merge)")
    t.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="--merge OUT PART_DIR...: join the parts made with --shard into OUT, linking their shards")
    t.add_argument("--val-fraction", type=float, default=0.01)
    t.add_argument("--format", choices=["text", "jsonl"], default=None)
    t.add_argument("--text-field", default="text")
    t.add_argument("--doc-per", choices=["line", "file", "blank-line"], default="blank-line")
    t.add_argument("--workers", type=int, default=0, help="tokenizer processes; 0: one per core (on <=2 cores, the tokenizer's threads in-process)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")
    t.set_defaults(fn=_prepare)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="pretrain (or continue pretraining) an encoder")
    t.__class__ = _IntermixedParser  # overrides before or after the options
    t.add_argument("--config", default=None,
                   help="a TOML file or a preset name from src/maskedlm/configs/ (default: modern-mini; with --resume, the run's own)")
    t.add_argument("--data", required=True, action=_Repeatable, metavar="DATA_DIR",
                   help="prepared data; several --data make a mixture (shares: data.weights=[...], default by size)")
    t.add_argument("--out", required=True, metavar="RUN_DIR")
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR's latest checkpoint")
    t.add_argument("--init-from", default=None, metavar="HF_DIR", help="start from a Hugging Face BERT/ModernBERT checkpoint")
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    t.set_defaults(fn=_train)


def _add_eval(sub) -> None:
    t = sub.add_parser("eval", help="masked loss, accuracy and perplexity at a fixed evaluation mask")
    t.__class__ = _IntermixedParser
    t.add_argument("model", metavar="MODEL", help="run dir, checkpoint dir or Hugging Face dir")
    t.add_argument("--data", required=True, action=_Repeatable, metavar="DATA_DIR",
                   help="several --data: each one's numbers and their total weighted as the run's mixture")
    t.add_argument("--split", choices=["val", "train", "all"], default="val")
    t.add_argument("overrides", nargs="*", metavar="eval.key=value")
    t.set_defaults(fn=_eval)


def _add_fill(sub) -> None:
    t = sub.add_parser("fill", help="top-k tokens at each [MASK]")
    t.add_argument("model", metavar="MODEL")
    t.add_argument("text", help="the text with [MASK]; - reads it from standard input")
    t.add_argument("--top-k", type=int, default=5)
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=_fill)


def _add_explain(sub) -> None:
    t = sub.add_parser("explain", help="the objective's view of one example: x, A(x), x̄, −log p per position")
    t.add_argument("model", metavar="MODEL")
    t.add_argument("text", help="- reads it from standard input")
    t.add_argument("--mask", nargs="+", required=True, metavar="WORD_OR_INDEX")
    t.add_argument("--seed", type=int, default=0, help="seed of the 80/10/10 corruption (default: every selected token becomes [MASK])")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=_explain)


def _add_score(sub) -> None:
    t = sub.add_parser("score", help="pseudo-log-likelihood of a text (each token masked in turn)")
    t.add_argument("model", metavar="MODEL")
    t.add_argument("text", help="- reads it from standard input")
    t.set_defaults(fn=_score)


def _add_demo(sub) -> None:
    t = sub.add_parser("demo", help="the embedded default run on Shakespeare's works")
    t.add_argument("--minutes", type=float, default=None, help="training budget (default: 5, or 0.25 with --quick)")
    t.add_argument("--quick", action="store_true", help="end within a minute (CI)")
    t.add_argument("--out", default="demo_out", metavar="DIR")
    t.set_defaults(fn=_demo)


def _add_export(sub) -> None:
    t = sub.add_parser("export", help="write a Hugging Face transformers directory")
    t.add_argument("model", metavar="MODEL")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(fn=_export)


def _add_import(sub) -> None:
    t = sub.add_parser("import", help="convert a Hugging Face BERT/ModernBERT directory into a maskedlm model")
    t.add_argument("hf_dir", metavar="HF_DIR")
    t.add_argument("--out", required=True, metavar="MODEL")
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(fn=_import)


def _add_masks(sub) -> None:
    t = sub.add_parser("masks", help="show what a masking configuration does to the data")
    t.__class__ = _IntermixedParser  # overrides before or after the options
    t.add_argument("data", metavar="DATA_DIR")
    t.add_argument("--config", default=None, help="a TOML file or preset (its masking section)")
    t.add_argument("--rows", type=int, default=3)
    t.add_argument("--split", choices=["train", "val"], default="train")
    t.add_argument("--json", action="store_true", help="print the statistics as JSON")
    t.add_argument("--step", type=int, default=0, help="training step (for masking.rate_schedule)")
    t.add_argument("--epoch", type=int, default=0)
    t.add_argument("--max-rows", type=int, default=0, help="statistics over the first N rows (0: the whole split)")
    t.add_argument("overrides", nargs="*", metavar="masking.key=value")
    t.set_defaults(fn=_masks)


def _add_finetune(sub) -> None:
    t = sub.add_parser("finetune", help="fine-tune (or --probe) a MODEL on labelled data: classify, regress, tokens")
    t.__class__ = _IntermixedParser
    t.add_argument("model", metavar="MODEL", help="run dir, checkpoint dir or Hugging Face dir")
    t.add_argument("--train", metavar="FILE", help="CSV/TSV with a header, JSON Lines or CoNLL; .gz ok")
    t.add_argument("--eval", metavar="FILE", help="evaluated each epoch; picks the best checkpoint (and the lr)")
    t.add_argument("--test", default=None, metavar="FILE", help="scored with the best checkpoint; predictions.jsonl")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--task", choices=["classify", "regress", "tokens"], default="classify")
    t.add_argument("--text-field", default=None, help="default: text (tokens: tokens)")
    t.add_argument("--text-pair-field", default=None, help="the second text of a pair (e.g. GLUE's sentence2)")
    t.add_argument("--label-field", default=None, help="default: label (tokens: tags)")
    t.add_argument("--seeds", type=int, default=1, help="runs with seeds finetune.seed, +1, ...; mean, std, median")
    t.add_argument("--probe", action="store_true", help="frozen encoder, features once, a linear head")
    t.add_argument("--suite", metavar="SUITE.toml", help="several tasks in turn (files, kind, metric each); one table")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    t.add_argument("overrides", nargs="*", metavar="finetune.key=value")
    t.set_defaults(fn=_finetune)


def _add_report(sub) -> None:
    t = sub.add_parser("report", help="a self-contained HTML report: curves of one or more runs, the objective's "
                       "anatomy; or a finetune --suite DIR's table")
    t.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs, or one finetune --suite output DIR")
    t.add_argument("--data", default=None, metavar="DATA_DIR",
                   help="also show the anatomy of each run's latest checkpoint on this data's evaluation mask")
    t.add_argument("--out", default="report.html", metavar="FILE", help="the page to write (default: report.html)")
    t.add_argument("--png", default=None, metavar="DIR", help="also write every figure as a PNG into DIR")
    t.set_defaults(fn=_report)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one `_add_COMMAND` per subcommand, in the order `maskedlm --help` lists them."""
    p = _Parser(prog="maskedlm", description="Pretrain transformer encoders with masked language modelling.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_tokenizer(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_fill(sub)
    _add_explain(sub)
    _add_score(sub)
    _add_demo(sub)
    _add_export(sub)
    _add_import(sub)
    _add_masks(sub)
    _add_finetune(sub)
    _add_report(sub)
    return p


# What the disk or the OS can refuse while an output is written: one line, as for bad input (the causes are outside).
_WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"maskedlm: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:
            raise
        # Every writer builds in a temporary file or directory and removes it on error, so the old output stands.
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        where = (f" while writing {e.filename}" if full else f": {e.filename}") if e.filename else ""
        fix = "free space and run again" if full else "check the path's permissions, or choose another --out"
        print(f"maskedlm: error: {_WRITE_ERRORS[e.errno]}{where}; nothing was replaced; {fix}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("maskedlm: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
