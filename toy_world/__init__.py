"""The toy world of the shipped demo model, apart from the product: coloured shapes moving over plain
backgrounds (`synthetic.py`), the judge of its videos (`evaluation.py`), and the scripts that build and
measure the model in assets/default_model (`train_default_model.sh` runs them in order)."""
