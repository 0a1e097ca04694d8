"""eq. 6, the margin-based triplet loss on match scores, and the alternatives of Table 11.

    L = sum_i max(0, d(pos_i) - d(neg_i) + M),   d = -score

An item's score matrix S has shape (n_img, n_txt) with S[0, 0] the true pair; its negatives are the other images
for the true text (S[1:, 0], ComVG) and the other texts for the true image (S[0, 1:], RefCOCOg, VQAv2, COCO).
With several negatives the hardest one is used (default) or the hinge is averaged over all of them. The batch loss
is the mean over items (eq. 6 sums; a mean keeps the learning rate independent of the batch size).

Table 11's alternatives: `ce`, cross-entropy of the true pair against its candidates (softmax over the row or
column of the item's score matrix), and `diffusion`, the plain denoising MSE on the true pairs. `correct`, the
training-accuracy proxy train.py reports beside the loss, is no loss; it stays here beside `candidates`, which it reads.
"""
import torch
import torch.nn.functional as F

LOSSES = ("margin", "ce", "diffusion")


def candidates(S):
    """(positive score (), negative scores (K,)) of one item's score matrix (n_img, n_txt)."""
    return S[0, 0], torch.cat([S[1:, 0], S[0, 1:]])


def margin_loss(matrices, margin=0.1, negatives="hardest"):
    losses = []
    for S in matrices:
        pos, neg = candidates(S)
        hinge = F.relu(neg - pos + margin)                      # d(pos) - d(neg) + M with d = -score
        losses.append(hinge.max() if negatives == "hardest" else hinge.mean())
    return torch.stack(losses).mean()


def ce_loss(matrices, temperature=1.0):
    losses = []
    for S in matrices:
        pos, neg = candidates(S)
        logits = torch.cat([pos[None], neg]) / temperature     # (1 + K,), the true pair first
        losses.append(F.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long, device=logits.device)))
    return torch.stack(losses).mean()


def diffusion_loss(model, items, generator):
    """Table 11's 'diffusion loss': E ||target - eps_theta(z_t, t, y)||^2 on the true pairs, t uniform in [0, T);
    the target is eps, or the velocity for a v-prediction model (`model.target`)."""
    latents = model.encode_images([ims[0] for ims, _ in items])
    hidden, mask = model.encode_texts([ts[0] for _, ts in items])
    T = model.scheduler.config.num_train_timesteps
    t = int(torch.randint(T, (1,), generator=generator))
    eps = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    z_t, ts = model.add_noise(latents, eps, model.timestep(t / T))   # t itself for DDPM; shifted for flow
    _, eps_pred = model.unet_pass(z_t, ts, hidden, mask)
    return F.mse_loss(eps_pred.float(), model.target(latents, eps, ts).float())


def correct(S):
    """A training-accuracy proxy: the true pair beats every negative of its item."""
    pos, neg = candidates(S)
    return bool((pos > neg).all())
