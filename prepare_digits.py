"""Prepare the digits demo (no download: the digits ship inside scikit-learn).

    python prepare_digits.py                        # data/digits (train store) + data/digits_ref.npz
    python prepare_digits.py --retrain-classifier   # also retrain assets/digits_classifier.safetensors

Writes the training split as a feature store (train.py --data-path data/digits --vae none --image-size 8
--num-classes 10) and the held-out split as an ADM reference batch for
`evaluator.py --feature-net digits`. The shipped classifier is only overwritten on request.
"""
import argparse
import json
import os

from tinyfusion.checkpoint import save_weights
from tinyfusion.digits import (CLASSIFIER_PATH, SPLIT_SEED, TEACHER_MODEL, TEACHERS, DigitsExtractor, class_accuracy, evaluate_teacher,
                               load_digits_classifier,
                               load_split, to_uint8_gray, train_classifier, write_digits_data)
from tinyfusion.errors import run_main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", default="data/digits", help="feature store of the training split")
    parser.add_argument("--ref-batch", default="data/digits_ref.npz", help="held-out split as an ADM batch")
    parser.add_argument("--classifier", default=CLASSIFIER_PATH, help="digit classifier weights (.safetensors)")
    parser.add_argument("--retrain-classifier", action="store_true", help="train and overwrite --classifier")
    parser.add_argument("--epochs", type=int, default=40, help="classifier training epochs")
    parser.add_argument("--seed", type=int, default=SPLIT_SEED, help="split seed (and classifier seed)")
    parser.add_argument("--evaluate-teacher", type=int, default=0, metavar="N",
                        help="also sample N digits from the shipped teacher and print accuracy and feature FID")
    parser.add_argument("--teacher-model", default=TEACHER_MODEL, choices=sorted(TEACHERS),
                        help="which shipped teacher --evaluate-teacher samples (SiT: ODE, Euler steps)")
    args = parser.parse_args(argv)

    n_train, n_test = write_digits_data(args.data_path, args.ref_batch, args.seed)
    print(f"wrote {n_train} training digits to {args.data_path} and {n_test} held-out digits to {args.ref_batch}")
    x_train, y_train, x_test, y_test = load_split(args.seed)
    if args.retrain_classifier or not os.path.isfile(args.classifier):
        model = train_classifier(to_uint8_gray(x_train), y_train, epochs=args.epochs, seed=args.seed)
        acc = class_accuracy(DigitsExtractor(model), to_uint8_gray(x_test), y_test)
        # one metadata entry: safetensors writes several in random order, which would change the file's hash
        info = {"arch": "DigitClassifier", "split_seed": args.seed, "epochs": args.epochs, "held_out_accuracy": acc}
        save_weights(model.state_dict(), args.classifier, metadata={"digits_classifier": json.dumps(info)})
        print(f"saved classifier to {args.classifier}")
    else:
        acc = class_accuracy(DigitsExtractor(load_digits_classifier(args.classifier)), to_uint8_gray(x_test), y_test)
        print(f"kept existing classifier {args.classifier} (--retrain-classifier to overwrite)")
    print(f"classifier held-out accuracy: {acc:.4f} ({n_test} digits)")
    if args.evaluate_teacher:
        evaluate_teacher(args.ref_batch, n=args.evaluate_teacher, classifier=args.classifier, model=args.teacher_model)


if __name__ == "__main__":
    run_main(main)
