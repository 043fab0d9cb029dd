"""
nanofast-sample: sample from a trained model (nanoGPT's sample.py).

$ nanofast-sample --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=300
$ nanofast-sample --start=FILE:prompt.txt

Keys as in nanoGPT's sample.py (configurator rules as for nanofast-train); device and dtype default
to 'auto'. Works with nanofast checkpoints (which carry their vocabulary) and nanoGPT checkpoints
(whose vocabulary is read from the dataset's meta.pkl, loaded safely, or GPT-2's BPE through tiktoken).

By default it samples the run's best model: out_dir/ckpt_best.pt (the lowest val loss), or
out_dir/ckpt.pt where the run kept no separate best (a nanoGPT run, or one that never evaluated
past its start); --checkpoint=latest samples out_dir/ckpt.pt, the latest state.
"""
import math
import os
import sys

import torch

from nanofast.checkpoint import BEST_NAME, CKPT_NAME, CheckpointError, load_checkpoint
from nanofast.data import DataError
from nanofast.configurator import ConfigError, configure, run_cli
from nanofast.generation import cast_weights_to_bfloat16
from nanofast.model import GPT, KERNELS
from nanofast.training import DTYPES, device_type_of, precision, precision_error, resolve_device, resolve_dtype

HELP = __doc__.strip().split('\n\n')[0] + '\n\n' + __doc__.strip().split('\n\n')[-1]  # what it is; which checkpoint

# -----------------------------------------------------------------------------
DEFAULTS = dict(
    init_from='resume',  # 'resume': the model in out_dir/ckpt.pt; or 'gpt2', 'gpt2-medium', ... (needs transformers)
    out_dir='out',  # where the run's checkpoints are (init_from='resume')
    checkpoint='best',  # 'best': out_dir/ckpt_best.pt (ckpt.pt where there is none); 'latest': out_dir/ckpt.pt
    start="\n",  # the prompt; "FILE:path" reads it from a file
    num_samples=10,  # how many samples
    max_new_tokens=500,  # tokens generated per sample
    temperature=0.8,  # logits are divided by this: < 1 sharper, > 1 flatter, 0 = always the most likely token
    top_k=200,  # sample among the k most likely tokens only (0 = among all)
    seed=1337,
    device='auto',  # 'auto' (cuda, mps, cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype='auto',  # 'auto', 'float32', 'bfloat16' (on the CPU also bfloat16 weights) or 'float16'
    compile=False,  # torch.compile the model
    kernels='nanofast',  # 'nanofast' or 'torch'
    use_cache=True,  # keep the context's keys and values: each new token reads only itself
    data_dir='',  # where to look for the dataset's meta.pkl of a nanoGPT checkpoint ('' = the usual places)
)
# -----------------------------------------------------------------------------


class Codec:
    """encode: str -> list of ids; decode: list of ids -> str."""

    def __init__(self, encode, decode, name):
        self.encode, self.decode, self.name = encode, decode, name


def char_codec(itos, name):
    itos = {int(k): v for k, v in itos.items()}
    stoi = {v: k for k, v in itos.items()}

    def encode(s):
        unknown = sorted(set(ch for ch in s if ch not in stoi))
        if unknown:
            raise ConfigError(f"the prompt has characters the model's vocabulary lacks: {''.join(unknown)!r} "
                              f"(vocabulary: {''.join(itos[i] for i in sorted(itos))!r})")
        return [stoi[c] for c in s]

    def decode(ids):
        return ''.join(itos.get(i, '\ufffd') for i in ids)

    return Codec(encode, decode, name)


def find_codec(checkpoint, data_dir=''):
    """The vocabulary: the checkpoint's own (nanofast), the dataset's meta.pkl, or GPT-2's BPE."""
    if checkpoint is not None:
        meta = checkpoint.get('meta')
        if isinstance(meta, dict) and 'itos' in meta:
            return char_codec(meta['itos'], 'the checkpoint')
        dataset = (checkpoint.get('config') or {}).get('dataset')
        if dataset:
            from nanofast.data import dataset_dir
            cands = [os.path.join('data', dataset, 'meta.pkl'), os.path.join(dataset_dir(dataset, data_dir), 'meta.pkl')]
            for meta_path in cands:
                if os.path.exists(meta_path):
                    print(f"Loading meta from {meta_path}...")
                    from nanofast.data import read_meta
                    meta = read_meta(meta_path)
                    if isinstance(meta.get('itos'), dict):
                        return char_codec(meta['itos'], meta_path)
    # nothing character-level found: GPT-2's BPE, as nanoGPT assumes
    try:
        import tiktoken
    except ImportError:
        raise ConfigError("no vocabulary found: the checkpoint has none, no meta.pkl was found for its dataset, "
                          "and GPT-2's BPE needs the tiktoken package (pip install tiktoken)") from None
    print("No meta.pkl found, assuming GPT-2 encodings...")
    enc = tiktoken.get_encoding("gpt2")
    return Codec(lambda s: enc.encode(s, allowed_special={"<|endoftext|>"}), lambda l: enc.decode(l), 'gpt2')


def checkpoint_path(out_dir, which='best'):
    """The checkpoint file to sample: the run's best or its latest (see DEFAULTS['checkpoint'])."""
    best = os.path.join(out_dir, BEST_NAME)
    return best if which == 'best' and os.path.exists(best) else os.path.join(out_dir, CKPT_NAME)


def sample(config, out=None):
    """Generate config['num_samples'] samples; print them to `out` (stdout) and return them."""
    c = dict(DEFAULTS)
    c.update(config)
    if c['kernels'] not in KERNELS:
        raise ConfigError(f"kernels must be one of {KERNELS}, got {c['kernels']!r}")
    if c['num_samples'] < 0 or c['max_new_tokens'] < 0:
        raise ConfigError("num_samples and max_new_tokens must be >= 0")
    if not (math.isfinite(c['temperature']) and c['temperature'] >= 0):
        raise ConfigError(f"temperature must be a finite number >= 0, got {c['temperature']!r}")
    if c['checkpoint'] not in ('best', 'latest'):
        raise ConfigError(f"checkpoint must be 'best' or 'latest', got {c['checkpoint']!r}")
    out = sys.stdout if out is None else out
    device = resolve_device(c['device'])
    device_type = device_type_of(device)
    dtype = resolve_dtype(c['dtype'], device_type)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    unsupported = precision_error(dtype, device_type, c['kernels'])
    if unsupported:
        raise ConfigError(f"dtype={unsupported}")

    torch.manual_seed(c['seed'])
    if torch.cuda.is_available():
        torch.cuda.manual_seed(c['seed'])
    ctx = precision(dtype, device_type).ctx

    checkpoint = None
    if c['init_from'] == 'resume':
        ckpt_path = checkpoint_path(c['out_dir'], c['checkpoint'])
        checkpoint = load_checkpoint(ckpt_path, map_location='cpu')
        model = GPT.from_checkpoint(checkpoint, kernels=c['kernels'], override_args=dict(dropout=0.0))
    elif c['init_from'].startswith('gpt2'):
        model = GPT.from_pretrained(c['init_from'], dict(dropout=0.0), kernels=c['kernels'])
    else:
        raise ConfigError(f"init_from must be 'resume' or a GPT-2 model name, got {c['init_from']!r}")
    model.eval()
    model.to(device)
    if device_type == 'cpu' and dtype == 'bfloat16':
        # each token reads every weight once: bfloat16 copies halve the bytes, and autocast would round
        # the float32 weights to the same values before each product
        cast_weights_to_bfloat16(model)
    if c['compile']:
        model = torch.compile(model)

    codec = find_codec(checkpoint, c['data_dir'])
    start = c['start']
    if start.startswith('FILE:'):
        path = start[5:]
        try:
            with open(path, 'r', encoding='utf-8') as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the prompt file {path}: {e}") from None
    start_ids = codec.encode(start)
    if not start_ids:
        raise ConfigError("the prompt (start) is empty")
    x = (torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...])

    top_k = c['top_k'] if c['top_k'] and c['top_k'] > 0 else None
    samples = []
    with torch.no_grad():
        with ctx:
            for k in range(c['num_samples']):
                y = model.generate(x, c['max_new_tokens'], temperature=c['temperature'], top_k=top_k,
                                   use_cache=c['use_cache'])
                text = codec.decode(y[0].tolist())
                samples.append(text)
                print(text, file=out)
                print('---------------', file=out, flush=True)
    return samples


def main(argv=None):
    """Entry point of `nanofast-sample`."""
    argv = sys.argv[1:] if argv is None else argv
    def body():
        sample(configure(DEFAULTS, list(argv), verbose=False, prog='nanofast-sample',
                         doc=HELP))

    return run_cli('nanofast-sample', body, failures=(CheckpointError, DataError))


if __name__ == '__main__':
    sys.exit(main())
