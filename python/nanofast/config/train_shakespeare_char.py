# nanoGPT's baby GPT on tiny shakespeare, character by character (same values as nanoGPT's
# config/train_shakespeare_char.py). On a GPU it reaches a val loss of about 1.47; on a laptop CPU
# add --device=cpu --compile=False and shrink the model (see nanofast-train --help).

out_dir = 'out-shakespeare-char'
eval_interval = 250  # the model overfits this small corpus: watch val loss often
eval_iters = 200
log_interval = 10

# keep only the checkpoint with the best val loss
always_save_checkpoint = False

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a small network tolerates a high learning rate
max_iters = 5000
lr_decay_iters = 5000  # the cosine ends with the run
min_lr = 1e-4  # a tenth of learning_rate
beta2 = 0.99  # few tokens per step: average the second moment over more steps

warmup_iters = 100
