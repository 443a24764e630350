"""``python -m common.release_classifier --config configs/default.yaml checkpoints/mnist_classifier.safetensors``:
train the MNIST classifier of the classifier metrics with the config's ``eval.classifier`` recipe (its ``weights`` /
``sha256`` are ignored) and release it as FILE + FILE's provenance ``.json``; prints the ``eval.classifier`` keys to
paste into the config (see ``common.evaluation.classifier``). A few minutes on 2 CPU cores."""
import os

from common.core import cli, machine
from common.evaluation.classifier import release_classifier, release_command


def main():
    p = cli.parser(__doc__)
    p.add_argument("out", help="the .safetensors file to write (its provenance goes beside it as .json)")
    args = p.parse_args()
    if not args.out.endswith(".safetensors"):
        p.error(f"{args.out}: the released classifier is a .safetensors file")
    cfg = cli.load(args)
    print(f"[classifier] training on {machine.describe()}")
    with cli.clear_errors():
        retrain = release_command(cfg.source, args.out, cfg.overrides)
        sha, prov, record = release_classifier(cfg.data, cfg.eval.classifier, args.out, retrain,
                                               progress=not args.no_progress)
    print(f"[classifier] MNIST test accuracy {record['test_accuracy']:.4f} -> {args.out}, {prov}")
    print(f"eval:\n  classifier:\n    weights: {os.path.relpath(args.out)}\n    sha256: {sha}")


if __name__ == "__main__":
    main()
