import torch

# The test models are tiny: thread start-up costs more than it saves, and on a busy 2-core
# machine two threads made the suite several times slower. Both sides of every comparison
# run under the same setting.
torch.set_num_threads(1)
