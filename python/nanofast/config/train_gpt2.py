# GPT-2 small (124M parameters) on OpenWebText: nanoGPT's train.py defaults, spelled out.
# Meant for 8 GPUs: torchrun --standalone --nproc_per_node=8 -m nanofast.train config/train_gpt2.py
# OpenWebText is not prepared by nanofast: run nanoGPT's data/openwebtext/prepare.py and pass
# --data_dir=/path/to/nanoGPT/data (or start from the nanoGPT folder).

wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

dataset = 'openwebtext'

# 12 sequences x 1024 tokens x 40 micro-batches = 491,520 tokens per step
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# 600k steps, about 300B tokens
max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
