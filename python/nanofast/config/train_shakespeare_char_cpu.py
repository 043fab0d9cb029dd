# The fastest way found to a val loss of 1.70 on tiny shakespeare on a CPU, with nanoGPT's model family:
# nanoGPT's CPU-sized baby GPT cut to one layer (4 heads, 128 wide, 64 characters of context), a larger
# batch and a higher learning rate, bfloat16 where the CPU has it, and one evaluation at the end. At this
# budget depth does not pay: per second of training, fewer layers reached a lower loss.
#   nanofast-train config/train_shakespeare_char_cpu.py
# The README's "A CPU recipe" says what it reaches and how fast, and how it was chosen.

out_dir = 'out-shakespeare-char-cpu'
device = 'cpu'
compile = False
dtype = 'bfloat16'  # bfloat16 autocast: on a CPU without AVX512-BF16 pass --dtype=float32

dataset = 'shakespeare_char'
batch_size = 32  # 2048 tokens a step: larger products run nearer the machine's matmul rate
block_size = 64
gradient_accumulation_steps = 1

n_layer = 1
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 5e-3  # this small network trains stably at five times nanoGPT's rate
max_iters = 1600
lr_decay_iters = 1600  # the cosine ends with the run
min_lr = 3e-4
beta2 = 0.99
warmup_iters = 50

# evaluation is part of the wall-clock: once at the end (and at the start, as nanoGPT does), on
# 50 batches of each split
eval_interval = 1600
eval_iters = 50
log_interval = 100
always_save_checkpoint = False
