# The toy world (data/toyworld.py) at CPU size: every stage of the recipe, one command each (README "Toy world").
#   python train.py config/toy.py --stage=teacher --max_iters=...
#   python train.py config/toy.py --stage=ode --max_iters=...
#   python train.py config/toy.py --stage=redmd --max_iters=...
import os as _os

_toy = _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "data", "toy")  # found from any directory
model = "toy"  # model.PRESETS["toy"]: one token per latent pixel, 16 x 4 x 4 latents per frame
vae = _os.path.join(_toy, "vae.safetensors")  # written by python vae.py train: 16x16 RGB -> 16 x 4 x 4, frame by frame
text_encoder = _toy  # written by data/prepare_toy.py: word tokenizer + frozen random tiny umT5
prompts = _os.path.join(_toy, "prompts.txt")
negative_prompt = ""  # the teacher learns the unconditional branch from empty captions
out_dir = "out/toy"
teacher = "out/toy/teacher"  # the teacher stage's folder: its latest EMA weights
# sizes are the video's (pixels); the toy VAE keeps every frame, so 12 frames are 12 latent frames of 4 x 4
num_frames = 12  # 4 chunks of 3 frames; evaluation streams 120+
height = 16
width = 16
batch_size = 8  # the teacher stage: --batch_size=16
# teacher
lr_teacher = 5e-4
teacher_shift = 3.0
# ODE pairs: fewer teacher steps than Wan's 48 suffice for a world this simple
ode_pairs = 512
ode_steps = 24
ode_shift = 3.0  # the teacher trained at shift 3
ode_guidance = 2.0  # CFG 3 bled the object colour into the background on this small teacher
# Re-DMD at toy scale: the paper's 2e-6 / 4e-7 fine-tune a 1.3B model; same 5:1 ratio here
lr_student = 1e-4
lr_critic = 2e-5
student_every = 5
ema_start = 50
dmd_guidance = 2.0
reward = "toy"  # VideoAlign's role: the learned motion-quality judge reward.ToyMotionReward, data/toy/reward.safetensors
save_interval = 100
log_interval = 10
