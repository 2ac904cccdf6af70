"""The ``neuroidx`` command: index a model over an image folder, then make Neuron Features, selectivity
indexes, ablation drops, maximisation images and an HTML report in one run directory.

    neuroidx demo [--out DIR]                       everything, on the built-in model and data
    neuroidx index --model M --data D --layers L --out DIR [--weights W] [--k K] ...
    neuroidx features | selectivity | ablate | visualize  --out DIR
    neuroidx report DIR
    neuroidx info

Errors are one line on stderr and a non-zero exit (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import warnings

__all__ = ["main", "build_parser"]


def _int_at_least(least: int, said: str):
    """An option's type: an int >= ``least``, checked by the parser, before the command touches anything
    (--force drops a layer's record first)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {said}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected {said}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _layers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one layer name (comma-separated)")
    return names


def _units(text: str) -> list[int]:
    try:
        units = [int(u) for u in text.split(",") if u.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"units must be comma-separated integers, got {text!r}") from None
    repeated = sorted({u for u in units if units.count(u) > 1})
    if repeated:  # a unit twice would be two rows of one (layer, unit) in every table made from them
        raise argparse.ArgumentTypeError(f"units {repeated} are given more than once in {text!r}")
    return units


def _pad(text: str):
    """--pad: a mode name as it is, else a number or comma-separated numbers (one per channel)."""
    if text.strip() in ("gray", "zero", "mean", "edge"):
        return text.strip()
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected gray, zero, mean, edge, a number or comma-separated numbers "
                                         f"(one per channel), got {text!r}") from None
    return values[0] if len(values) == 1 else values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuroidx", description="Index what the units of a trained CNN respond to.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="the run directory (made by `index`, read by the others)")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    common.add_argument("--batch-size", type=_positive_int, default=None,
                        help="images per batch (default 64; `index` resuming a run: the run's)")
    common.add_argument("--workers", type=_non_negative_int, default=0,
                        help="DataLoader worker processes (0: read images in the main process)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--layers", type=_layers, default=None,
                        help="comma-separated layer names (default for later steps: the run's layers)")

    source = argparse.ArgumentParser(add_help=False)
    source.add_argument("--model", default=None,
                        help="package.module:factory, vgg_m, demo, or a torchvision / timm model name (required, "
                             "with --data, unless DIR holds a run: then `index --out DIR` alone resumes it)")
    source.add_argument("--model-args", default=None, help="JSON keyword arguments for the model factory")
    source.add_argument("--weights", default=None, help="a state dict: .safetensors, or a torch file (weights_only)")
    source.add_argument("--data", default=None,
                        help="an image folder (one subfolder per class), or builtin:shapes")
    source.add_argument("--size", type=_positive_int, default=None, help="images are cropped to SIZE x SIZE (224)")
    source.add_argument("--resize", type=_positive_int, default=None, help="shorter side before the crop (default SIZE)")
    source.add_argument("--no-crop", action="store_true", help="resize to SIZE x SIZE without keeping the aspect")
    source.add_argument("--normalize", default=None,
                        help="imagenet (default) | none | mean,std | m1,m2,m3,s1,s2,s3")
    source.add_argument("--k", type=_positive_int, default=None, help="top images kept per unit (100)")
    source.add_argument("--images", type=_positive_int, default=None, help="index only the first N images")

    index = sub.add_parser("index", parents=[common, source], help="stream the images once; resumable")
    index.add_argument("--checkpoint-every", type=_positive_int, default=50, help="batches between checkpoints")
    index.add_argument("--force", action="store_true", help="index again even if DIR holds a finished index")

    redo = argparse.ArgumentParser(add_help=False)
    redo.add_argument("--force", action="store_true",
                      help="make every layer again (by default a layer made with the same settings is skipped)")
    features = sub.add_parser("features", parents=[common, redo], help="Neuron Features and top crops (PNG)")
    features.add_argument("--pad", type=_pad, default="gray",
                          help="gray | zero | mean | edge | a pixel value | one value per channel (r,g,b)")
    features.add_argument("--keep", type=_non_negative_int, default=9, help="top crops kept per unit")

    selectivity = sub.add_parser("selectivity", parents=[common], help="color and class selectivity, table, plots")
    selectivity.add_argument("--gray", default="luminance", choices=["luminance", "pca"])
    selectivity.add_argument("--tau", type=float, default=1.0)
    selectivity.add_argument("--color-threshold", type=float, default=0.25)
    selectivity.add_argument("--class-threshold", type=float, default=None,
                             help="gamma above which a unit counts as class selective in the plots and summary "
                                  "(default: halfway from the least gamma the run's K and classes allow to 1; "
                                  "0.5 with at least K classes)")

    ablate = sub.add_parser("ablate", parents=[common, redo], help="per-unit, per-class accuracy drops")
    ablate.add_argument("--mode", default="zero", choices=["zero", "mean"])
    ablate.add_argument("--units", type=_units, default=None, help="comma-separated units (default: every unit)")

    visualize = sub.add_parser("visualize", parents=[common, redo], help="activation-maximisation images")
    visualize.add_argument("--units", type=_units, default=None, help="comma-separated units")
    visualize.add_argument("--max-units", type=_positive_int, default=16, help="per layer, without --units")
    visualize.add_argument("--steps", type=_positive_int, default=128)
    visualize.add_argument("--image-size", type=_positive_int, default=None, help="default: the indexed size")

    report = sub.add_parser("report", help="write the static HTML report of a run directory")
    report.add_argument("out", help="the run directory")
    report.add_argument("--debug", action="store_true")

    demo = sub.add_parser("demo", help="the whole pipeline on the built-in model and data, then the report")
    demo.add_argument("--out", default="neuroidx-demo")
    demo.add_argument("--device", default=None)
    demo.add_argument("--images", type=_positive_int, default=None, help="how many images (default 600)")
    demo.add_argument("--quick", action="store_true", help="a reduced setting (for tests)")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--debug", action="store_true")

    info = sub.add_parser("info", help="print versions, devices and the backends that loaded")
    info.add_argument("--debug", action="store_true")
    return parser


def _run(args) -> int:
    if args.command == "info":
        from .info import info_text

        print(info_text())
        return 0
    from . import pipeline
    from .outdir import OutDir

    # every command below writes in its run directory: one at a time (OutDir.writing), for the whole command
    if args.command == "report":
        with OutDir(args.out).writing():
            path = pipeline.step_report(args.out)
        print(f"report: {path}")
        return 0
    if args.command == "demo":
        with OutDir(args.out).writing(create=True):
            path = pipeline.run_demo(args.out, device=args.device, images=args.images, quick=args.quick,
                                     progress=not args.no_progress)
        print(f"demo finished; open {path}")
        return 0
    step = {"index": pipeline.step_index, "features": pipeline.step_features,
            "selectivity": pipeline.step_selectivity, "ablate": pipeline.step_ablate,
            "visualize": pipeline.step_visualize}[args.command]
    with OutDir(args.out).writing(create=args.command == "index"):
        step(args)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one line for a person (--debug keeps Python's form, with the file and line)."""
    print(f"neuroidx: warning: {message}", file=file or sys.stderr)


_ORIGINAL_TRACEBACK = "Original Traceback (most recent call last):"


def _worker_error(text: str) -> str | None:
    """The error a DataLoader worker process raised, from the message torch re-raises it with in the main
    process ("Caught ValueError in DataLoader worker process 0." first, then the worker's traceback): the
    first line of the traceback's last exception, without its type name (as with --workers 0, e.g.
    "cannot read image '...': image file is truncated"). None for any other message."""
    if _ORIGINAL_TRACEBACK not in text:
        return None
    lines = text.split(_ORIGINAL_TRACEBACK, 1)[1].splitlines()
    # the frames ("  File ...", then the code) are indented; the exception line after the last one is not
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    after = lines[frames[-1] + 1:] if frames else lines
    head = next((line.strip() for line in after if line.strip() and not line[0].isspace()), None)
    if head is None:
        return None
    kind, colon, rest = head.partition(":")
    if re.fullmatch(r"[A-Za-z_][\w.]*", kind):  # "ValueError: message" (or "ValueError" alone)
        head = rest.strip() if colon and rest.strip() else kind
    if kind == "KeyError" and len(head) > 1 and head[0] in "'\"" and head.endswith(head[0]):  # the quoted key
        head = head[1:-1]
    return head


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "batch_size"):  # (the subcommands with the common options)
        args.batch_size_given = args.batch_size is not None
        args.batch_size = 64 if args.batch_size is None else args.batch_size
    try:
        with warnings.catch_warnings():
            if not getattr(args, "debug", False):
                warnings.showwarning = _show_warning
            return _run(args)
    except KeyboardInterrupt:
        resumes = {"index": f"resumes from its last checkpoint (one every {getattr(args, 'checkpoint_every', 50)} "
                            "batches; from the start if none was written yet)",
                   "features": "skips the layers it finished",
                   "ablate": "skips the layers it finished", "visualize": "skips the layers it finished"}
        how = resumes.get(args.command)
        # the same command with its options (features --keep 2 ...), less --force, which would remake what
        # is done; index resumes from its recorded settings
        given = [str(a) for a in (sys.argv[1:] if argv is None else argv) if str(a) != "--force"]
        again = "neuroidx " + shlex.join(["index", "--out", str(args.out)] if args.command == "index" else given)
        print(f"neuroidx: interrupted{f' (run again: `{again}` {how})' if how else ''}", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure is one line for a person; --debug shows the traceback
        if getattr(args, "debug", False):
            raise
        message = _worker_error(str(exc)) or (str(exc).strip().splitlines()[0] if str(exc).strip()
                                              else type(exc).__name__)
        if isinstance(exc, KeyError) and message.startswith(("'", '"')):
            message = message[1:-1]
        print(f"neuroidx: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
