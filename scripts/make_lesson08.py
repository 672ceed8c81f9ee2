"""Writes solutions/08_unclip_prior.ipynb from the cells below (outputs empty; run
``python -m kandlab.course execute 08_unclip_prior`` afterwards to execute it and build the learner copy).

Kept beside the lesson so its prose and code can be edited as text; the notebook is what learners open.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "solutions" / "08_unclip_prior.ipynb"
CELLS: list[dict] = []


def md(text: str) -> None:
    CELLS.append({"cell_type": "markdown", "metadata": {}, "source": text.strip("\n")})


def code(text: str, *tags: str) -> None:
    CELLS.append({"cell_type": "code", "execution_count": None, "metadata": {"tags": list(tags)} if tags else {},
                  "outputs": [], "source": text.strip("\n")})


md(r"""
# 08 · The unCLIP prior: two stages, as Kandinsky 2.1 and 2.2

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/kandlab/kandlab/blob/main/notebooks/08_unclip_prior.ipynb)

**You will** take apart the design of Kandinsky 2.1 and 2.2 (and DALL-E 2): a **prior** turns a caption into a
CLIP *image* embedding, and a **decoder** turns that embedding into an image. You train nothing here — the shipped
tiny CLIP, prior and decoder were trained on the shapes world by `kandlab train clip-tiny`, `prior-tiny` and
`decoder-tiny` — and you measure what the embedding in the middle keeps and what it loses, which is why
Kandinsky 3 went back to conditioning on text tokens.

**Objectives**
1. Write CLIP's contrastive loss and measure what the tiny CLIP's embedding knows, category by category.
2. Ask whether it *binds* attributes to objects, and whether it knows *where* things are.
3. Build the prior's token layout and mask, and one step of its sampler; compare it with a regression.
4. Use the decoder three ways: from the prior (text → image), from an image (variations), and from a mixture.
5. Measure the two-stage pipeline against lesson 07's direct text-to-image model on the same 512 prompts.

**Prerequisites:** lessons 02, 05 and 07. The models are the shipped `clip_tiny` ([card](../data/clip_tiny.md)),
`prior_tiny` ([card](../data/prior_tiny.md)), `prior_tiny_regression` ([card](../data/prior_tiny_regression.md)),
`decoder_tiny` ([card](../data/decoder_tiny.md)) and, for comparison, `latent_text` ([card](../data/latent_text.md)).
**Run time** (measured on a 2-core CPU): full run 119 s · FAST mode (the tests' setting) 20 s. No GPU needed.
""")

code(r"""
# Setup. On Colab: clone kandlab and install it *without* its dependencies, so Colab's own torch,
# numpy and Jupyter stay as they are; then add ipywidgets 8 (Colab ships 7) and switch Colab's
# frontend to the widget manager ipywidgets 8 needs. Locally (kandlab already installed) it does nothing.
import sys, subprocess
if "google.colab" in sys.modules:
    subprocess.run("git clone -q --depth 1 https://github.com/kandlab/kandlab && "
                   "pip install -q --no-deps -e kandlab && pip install -q 'ipywidgets>=8,<9'", shell=True, check=True)
    sys.path.insert(0, "kandlab")
    from google.colab import output
    output.enable_custom_widget_manager()
""")

code(r"""
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from kandlab import clip as kclip, course, prior as kprior, shapes, train, train_unclip as tu, unclip, viz_unclip, weights
from kandlab.clip import CLIPTextConfig, CLIPTextTower, CLIPVisionConfig, CLIPImageTower
from kandlab.decoder import DecoderConfig, ImageConditionedUNet
from kandlab.pipeline import Pipeline
from kandlab.prior import PriorConfig, PriorTransformer
from kandlab.unclip import UnCLIPPipeline

torch.manual_seed(0)
plt.rcParams["figure.dpi"] = 72
g = torch.Generator().manual_seed(0)

pipe = UnCLIPPipeline.from_tiny()                   # clip_tiny + prior_tiny + decoder_tiny + movq_tiny
card = {name: weights.load_card(f"{name}.safetensors")
        for name in ("clip_tiny", "prior_tiny", "prior_tiny_regression", "decoder_tiny", "latent_text")}
latent_pipe = Pipeline.from_tiny("latent_text")     # lesson 07's direct model: T5 tokens → UNet on the same latents
""")

code(r"""
N_IMAGES = course.budget(full=512, fast=32)       # held-out 64×64 images for the CLIP and prior numbers
N_PROMPTS = course.budget(full=64, fast=4)        # prompts sampled live in §6
STEPS = course.budget(full=50, fast=4)            # decoder DDIM steps when we sample
PRIOR_STEPS = course.budget(full=25, fast=3)      # prior steps (Kandinsky 2.2's 25)

images, captions = tu.held_out(N_IMAGES)          # ShapesDataset(size=64, seed=2024): never trained on
print(f"{N_IMAGES} held-out images, e.g. {captions[0]!r}, {captions[1]!r}")
""")

md(r"""
## 1 · Two stages

Kandinsky 3 conditions its UNet on the T5 *tokens* of the prompt (lessons 04–07). Kandinsky 2.1 and 2.2 did
something else, taken from DALL-E 2 (Ramesh et al. 2022, "unCLIP"):

$$\text{caption} \xrightarrow{\ \text{CLIP text tower}\ } (h, \bar h) \xrightarrow{\ \text{prior}\ } e_{\text{img}}
\xrightarrow{\ \text{decoder}\ } z_0 \xrightarrow{\ \text{MoVQ}\ } \text{image}$$

* **CLIP** (Radford et al. 2021) is a text tower and an image tower trained so that an image and its caption land
  close together in one shared space.
* The **prior** is a diffusion model over *vectors*: given the caption's CLIP text features, it samples a plausible
  CLIP **image** embedding $e_{\text{img}}$ — the embedding an image of that caption would have.
* The **decoder** is a latent diffusion UNet conditioned on $e_{\text{img}}$ alone. It never sees text, so it can
  be trained on images without captions, and it can draw *any* embedding: one from the prior, one of an existing
  image, or a mixture of several.

Everything the decoder knows about the caption passes through one vector. Count the parts, at production size
(counted on the `meta` device: no memory is allocated) and at the course's size:
""")

code(r"""
def parameters(module):
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())

with torch.device("meta"):
    published = {
        "CLIP ViT-bigG/14 text tower": parameters(CLIPTextTower(CLIPTextConfig.vit_bigg_14())),
        "CLIP ViT-bigG/14 image tower": parameters(CLIPImageTower(CLIPVisionConfig.vit_bigg_14())),
        "prior (PriorTransformer)": parameters(PriorTransformer(PriorConfig.kandinsky2_2())),
        "decoder (K3 blocks, 2.2's conditioning)": parameters(ImageConditionedUNet(DecoderConfig.kandinsky2_2())),
    }
tiny = {"CLIP ViT-bigG/14 text tower": pipe.clip.text_tower, "CLIP ViT-bigG/14 image tower": pipe.clip.image_tower,
        "prior (PriorTransformer)": pipe.prior, "decoder (K3 blocks, 2.2's conditioning)": pipe.decoder}
print(f"{'':42s}{'Kandinsky 2.2':>16s}{'this course':>14s}")
for name, n in published.items():
    print(f"{name:42s}{n:>16,}{parameters(tiny[name]):>14,}")
course.claim(published["prior (PriorTransformer)"] == 1_026_225_920,
             "the Kandinsky 2.2 prior built from PriorConfig.kandinsky2_2() has exactly the 1,026,225,920 values of "
             "diffusers' PriorTransformer with the published config (tests/test_prior.py)",
             prior=published["prior (PriorTransformer)"])
""")

md(r"""
The published decoder is diffusers' `UNet2DConditionModel` (1.25 B parameters); kandlab's decoder puts the same
two conditioning modules (`ImageProjection`, `ImageTimeEmbedding`, parity-tested against diffusers) on the course's
Kandinsky 3 UNet, so its full-size count differs (the `DecoderConfig.kandinsky2_2` docstring). The prior and both
CLIP towers match their diffusers / transformers twins exactly (`tests/test_prior.py`, `tests/test_clip.py`).

## 2 · CLIP and the contrastive loss

Take a batch of $B$ images and their $B$ captions. Embed both and normalise to unit length; the $B\times B$
matrix of cosine similarities, multiplied by a learned inverse temperature $1/\tau$, is a table of logits in which
row $i$ should pick column $i$ (image $i$'s own caption) and column $j$ row $j$. CLIP's loss is the cross-entropy
both ways, averaged (InfoNCE; Radford et al. 2021, Fig. 3):

$$\mathcal L = \tfrac12\Big[\mathrm{CE}\big(S,\ [0..B)\big) + \mathrm{CE}\big(S^\top,\ [0..B)\big)\Big],\qquad
S_{ij} = \frac{1}{\tau}\,\frac{u_i\cdot v_j}{\lVert u_i\rVert\,\lVert v_j\rVert}$$

with $u$ the image embeddings and $v$ the text embeddings. Every other caption in the batch is a negative: the
loss never sees a caption that is *almost* right unless the batch happens to hold one.

### Exercise 1 — the InfoNCE loss
""")

code(r"""
def my_contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    # BEGIN SOLUTION
    # HINT: F.normalize both (B, P) tensors along the last axis; logits = logit_scale.exp() * u @ v.T, (B, B)
    # HINT: the right answer of row i is i: F.cross_entropy(logits, targets) and the same for logits.T, averaged
    u, v = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp() * u @ v.T
    targets = torch.arange(len(u))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    # END SOLUTION
""")

code(r"""
course.check(my_contrastive_loss, kclip.contrastive_loss,
             [(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.tensor(2.0)),
              (torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g), pipe.clip.logit_scale.detach())])
""", "nbval-check-output")

md(r"""
The shipped CLIP trained this loss for `clip_tiny`'s card steps on 40,000 (image, caption) pairs of the shapes
world. Here are eight held-out images against their eight captions: the diagonal should be the brightest entry of
its row and of its column.
""")

code(r"""
with torch.no_grad():
    u = F.normalize(pipe.embed_images(images[:8]), dim=-1)                        # (8, 64)
    v = F.normalize(pipe.encode_text(captions[:8])[1], dim=-1)                     # (8, 64)
sim = u @ v.T                                                                       # (8, 8) cos(image i, caption j)
fig = viz_unclip.plot_similarity(sim, images[:8], captions[:8], "clip_tiny: cosine similarity of 8 held-out "
                                 "images (columns) and their captions (rows)")
print(f"each image's own caption is its most similar one: {int((sim.argmax(1) == torch.arange(8)).sum())} of 8")
""")

md(r"""
Retrieval among eight random captions is easy: they differ in many words. The real question is *what* the
embedding keeps. For each held-out image and each category, let its true caption compete with every caption that
changes **one thing** of that category — another colour for one group, another shape, another count, or (for the
two-group captions) another relation — and count how often the true caption wins (`train_unclip.clip_retrieval`).
""")

code(r"""
retrieval = tu.clip_retrieval(pipe.clip, N_IMAGES)
print(f"{'':10s}{'accuracy':>10s}{'± se':>8s}{'chance':>8s}{'n':>6s}")
for category, r in retrieval.items():
    print(f"{category:10s}{r['accuracy']:>10.3f}{r['se']:>8.3f}{r['chance']:>8.3f}{r['n']:>6d}")
""")

code(r"""
attributes = ("colour", "shape", "count")
course.claim(all(retrieval[c]["accuracy"] > 0.95 for c in attributes)
             and abs(retrieval["position"]["accuracy"] - retrieval["position"]["chance"]) < 3 * retrieval["position"]["se"] + 0.05,
             "clip_tiny tells colour, shape and count apart almost every time, but picks the right relation "
             "(left of, right of, above, below) barely more often than chance",
             n=N_IMAGES, **{c: retrieval[c]["accuracy"] for c in (*attributes, "position")},
             position_chance=retrieval["position"]["chance"])
""")

md(r"""
## 3 · What the embedding loses: where things are

The tiny CLIP knows *what* is in the picture and almost nothing about *where*. Nothing in its loss asked for it:
in a batch of 128 random captions, the one that differs from the true caption only by its relation word is almost
never there, so the contrastive loss is already near its minimum without looking at positions. Yuksekgonul et al.
(2023, "When and why vision-language models behave like bags-of-words") found the same in the published CLIPs:
retrieval on ordinary batches does not need word order, so the models barely learn it.

Does it bind colours and shapes to the right objects? Swap the two groups' colours (or shapes): "a red circle left
of a blue square" against "a blue circle left of a red square" — the same words, attached differently. A bag of
words scores 0.5 (`train_unclip.clip_binding`):
""")

code(r"""
binding = tu.clip_binding(pipe.clip, N_IMAGES)
for attribute, r in binding.items():
    print(f"{attribute} swapped between the groups: true caption preferred {r['accuracy']:.3f} ± {r['se']:.3f} "
          f"(n = {r['n']}); cos(text, swapped text) = {r['text_cosine_to_swapped']:.2f}")
""")

code(r"""
course.claim(all(binding[a]["accuracy"] - 2 * binding[a]["se"] > 0.9 for a in ("colour", "shape")),
             "unlike a bag of words, clip_tiny binds colours and shapes to their objects: it prefers the true caption "
             "to the swapped one more than 90 % of the time (2 standard errors included)",
             n_colour=binding["colour"]["n"], colour=binding["colour"]["accuracy"],
             n_shape=binding["shape"]["n"], shape=binding["shape"]["accuracy"])
""")

md(r"""
So at this scale the failure the Kandinsky 3 authors describe — attributes swapping between objects — is not
where CLIP is weak: *binding* survives, *position* does not. (The published CLIPs are weaker binders than this
one: the shapes world has six colours and three shapes, and a 64-wide embedding has room for all of them.)

Explore the embedding yourself: type a caption (or pick an example) and see the held-out images nearest to it.
The first two examples differ only in their relation: compare what comes back.
""")

code(r"""
tokenizer = pipe.tokenizer
viz_unclip.retrieval_widget(pipe.clip, tokenizer, images, captions,
                            ["two red circles left of a blue square", "two red circles right of a blue square",
                             "a large yellow triangle", "three small cyan squares above a green circle"]);
""", "nbval-ignore-output")

md(r"""
## 4 · The prior: diffusion over a vector

Why not hand the decoder the caption's CLIP **text** embedding directly? Because CLIP's two towers put an image and
its caption *near* each other, not at the same point. Measure how near, on the held-out images: the cosine
similarity of each image's embedding to its caption's text embedding, to the embedding of the same caption drawn
again (another layout, the same words), and to a random other image:
""")

code(r"""
with torch.no_grad():
    true_e = F.normalize(pipe.embed_images(images), dim=-1)                                  # (N, 64)
    text_e = F.normalize(pipe.encode_text(captions)[1], dim=-1)                              # (N, 64)
    rng = torch.Generator().manual_seed(1)
    again = torch.stack([shapes.render(shapes.parse_caption(c), 64, int(torch.randint(10**9, (1,), generator=rng)))
                         for c in captions])
    again_e = F.normalize(pipe.embed_images(again), dim=-1)
cos = {"its caption's text embedding": (text_e * true_e).sum(-1),
       "the same caption, drawn again": (again_e * true_e).sum(-1),
       "a random other image": (true_e.roll(1, 0) * true_e).sum(-1)}
for name, c in cos.items():
    m, se = course.mean_se(c)
    print(f"cos(image embedding, {name:30s}) = {m:.3f} ± {se:.3f}  (n = {N_IMAGES})")
""")

code(r"""
modality_gap = course.mean_se(cos["the same caption, drawn again"] - cos["its caption's text embedding"])   # paired
course.claim(modality_gap[0] > 2 * modality_gap[1],
             "an image's embedding is closer to another drawing of its caption than to the caption's own text "
             "embedding", n=N_IMAGES, gap=modality_gap)
""")

md(r"""
The prior bridges that gap. It is a transformer that reads a sequence of tokens — the caption's $L = 16$ CLIP
hidden states, then four more: the pooled text embedding, the time step, the noisy image embedding $x_t$, and a
learned read-out token — and predicts the clean embedding $\hat x_0$ from the read-out token's output (diffusers'
`PriorTransformer`; the embeddings are first normalised with the training set's `clip_mean` and `clip_std`).

Two masks, added to the attention logits as $-10^4$: **causal** (token $i$ sees tokens $j \le i$, as in DALL-E
2's decoder-only prior) and **padding** (no query sees a padded text key). The read-out token is last, so it sees
everything real.

### Exercise 2 — the prior's attention bias
""")

code(r"""
def my_prior_mask(text_mask: torch.Tensor, num_extra: int = 4) -> torch.Tensor:
    # BEGIN SOLUTION
    # HINT: S = L + num_extra; a causal part: -1e4 above the diagonal of an (S, S) matrix (torch.triu(..., 1))
    # HINT: a padding part per key: -1e4 where text_mask is 0, and 0 for the num_extra extra tokens; add both,
    # HINT: and return (B, 1, S, S) — one bias shared by every head
    B, L = text_mask.shape
    S = L + num_extra
    padding = torch.cat([(1 - text_mask.float()) * -1e4, torch.zeros(B, num_extra)], dim=1)   # (B, S)
    causal = torch.triu(torch.full((S, S), -1e4), 1)                                          # (S, S)
    return (padding[:, None, :] + causal[None])[:, None]
    # END SOLUTION
""")

code(r"""
mask = tokenizer(captions[:3])["attention_mask"].bool()
course.check(my_prior_mask, kprior.prior_attention_mask,
             [(mask,), (torch.tensor([[True, True, False, False]]), 4), (torch.ones(2, 5, dtype=torch.bool), 2)])
""", "nbval-check-output")

md(r"""
The prior learns $\hat x_0$ directly (`prediction_type="sample"`): $\mathcal L = \lVert x_0 - f_\theta(x_t, t,
\text{caption})\rVert^2$ with $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$ on the cosine
schedule (`train_unclip.prior_loss`). Sampling walks the DDPM posterior from $x_T \sim \mathcal N(0, I)$ in 25
unevenly spaced steps (diffusers' `UnCLIPScheduler`, matched exactly by `prior.UnCLIPSampler`). One step from $t$
to $t'$, with $\bar\alpha' = \bar\alpha_{t'}$ and the jump's own $\beta = 1 - \bar\alpha_t/\bar\alpha'$:

$$\hat x_0 \leftarrow \mathrm{clip}(\hat x_0, \pm 10),\qquad
\tilde\mu = \frac{\sqrt{\bar\alpha'}\,\beta}{1-\bar\alpha_t}\,\hat x_0 + \frac{\sqrt{1-\beta}\,(1-\bar\alpha')}{1-\bar\alpha_t}\,x_t,
\qquad x_{t'} = \tilde\mu + \sqrt{\tfrac{1-\bar\alpha'}{1-\bar\alpha_t}\,\beta}\;z$$

(DDPM eq. 7; no noise on the last step, $t = 0$, where $\bar\alpha' = 1$.) One detail of the scheduler: when
$t' = t - 1$ it uses the stored $\beta_t$ rather than recomputing it from $\bar\alpha$ — in float32 they differ
where it shows, at the last step, whose $\hat x_0$ coefficient is then $\beta_0/(1-\bar\alpha_0) = 0.99947$, not 1.

### Exercise 3 — one prior sampling step
""")

code(r"""
def my_prior_step(x0_hat, t, x_t, t_prev, noise, alphas_cumprod, betas, clip_range=10.0):
    # BEGIN SOLUTION
    # HINT: a_t = alphas_cumprod[t]; a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else 1.0
    # HINT: beta = betas[t] when t_prev == t - 1, else 1 - a_t / a_prev
    # HINT: clamp x0_hat to ±clip_range, form the posterior mean, and add sqrt(variance) * noise unless t == 0
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
    beta = betas[t] if t_prev == t - 1 else 1 - a_t / a_prev
    x0_hat = x0_hat.clamp(-clip_range, clip_range)
    mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0_hat + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x_t
    if t == 0:
        return mean
    return mean + ((1 - a_prev) / (1 - a_t) * beta).sqrt() * noise
    # END SOLUTION
""")

code(r"""
sampler = kprior.UnCLIPSampler()
cases = [(torch.randn(2, 64, generator=g) * s, t, torch.randn(2, 64, generator=g), t_prev, torch.randn(2, 64, generator=g),
          sampler.alphas_cumprod, sampler.betas) for s, t, t_prev in ((1.0, 999, 957), (20.0, 500, 458), (1.0, 42, 0),
                                                                      (1.0, 7, 6), (1.0, 0, -1))]
course.check(my_prior_step,
             lambda x0, t, x, t_prev, z, *_: kprior.UnCLIPSampler().step(x0, t, x, t_prev, noise=z).x_prev,
             cases, atol=1e-5)
""", "nbval-check-output")

md(r"""
Sampling with guidance (scale 4, the empty caption as the unconditional branch, as Kandinsky 2.2's prior) gives one
image embedding per caption. DALL-E 2 (§5.1) compared its diffusion prior with a plain **regression** from text to
image embedding and preferred the diffusion prior. `prior_tiny_regression` is the same transformer trained as a
regression (fed $x_t = 0$ at one fixed $t$; `train_unclip.prior_loss(regression=True)`). Measure both on the
held-out captions: cosine similarity to the true image's embedding, and the caption test of §2 with the prior's
embedding in the place of the image's.
""")

code(r"""
regression = tu.load_tiny_prior("prior_tiny_regression")
with torch.no_grad():
    sampled = torch.cat([unclip.sample_prior(pipe.prior, pipe.clip, tokenizer, captions[i:i + 128], PRIOR_STEPS,
                                             seed=i) for i in range(0, N_IMAGES, 128)])      # (N, 64)
    regressed = unclip.regress_prior(regression, pipe.clip, tokenizer, captions)             # (N, 64)
cos["the diffusion prior's sample"] = (F.normalize(sampled, dim=-1) * true_e).sum(-1)
cos["the regression's output"] = (F.normalize(regressed, dim=-1) * true_e).sum(-1)
for name in ("its caption's text embedding", "the diffusion prior's sample", "the regression's output",
             "the same caption, drawn again"):
    m, se = course.mean_se(cos[name])
    print(f"cos(image embedding, {name:30s}) = {m:.3f} ± {se:.3f}  (n = {N_IMAGES})")
""")

code(r"""
prior_vs_text = course.mean_se(cos["the diffusion prior's sample"] - cos["its caption's text embedding"])   # paired
regression_vs_prior = course.mean_se(cos["the regression's output"] - cos["the diffusion prior's sample"])
regression_vs_again = course.mean_se(cos["the regression's output"] - cos["the same caption, drawn again"])
course.claim(prior_vs_text[0] > 2 * prior_vs_text[1],
             "the prior's samples are closer to the true image embedding than the caption's own text embedding is",
             full_only=True, n=N_IMAGES, prior_minus_text=prior_vs_text)
course.claim(regression_vs_prior[0] > 2 * regression_vs_prior[1] and regression_vs_again[0] > 2 * regression_vs_again[1],
             "the regression's outputs are closer still: closer than the prior's samples, and closer than another "
             "drawing of the same caption", full_only=True, n=N_IMAGES, regression_minus_prior=regression_vs_prior,
             regression_minus_drawn_again=regression_vs_again)
""")

md(r"""
The regression wins, and it should: trained with a squared error, it outputs the **mean** of the embeddings a
caption's images can have, and the centre of a cloud is closer, on average, to each point of the cloud than
another random point of it is — closer even than a second drawing of the same caption. A sample of a perfect
prior would be such a random point, as close as "drawn again" and no closer. What the mean gives up is *variety*:
the regression returns one embedding per caption, however many layouts fit it. Does the diffusion prior give
variety back? Sample it 16 times for a caption, and compare the spread of the samples, $1 - $ their mean pairwise
cosine, with the spread of the embeddings of 16 drawings of that caption:
""")

code(r"""
K = course.budget(full=16, fast=4)
probe = captions[:course.budget(full=8, fast=2)]

def spread(e):                                   # 1 − mean pairwise cosine of K embeddings (K, 64)
    e = F.normalize(e, dim=-1)
    s = e @ e.T
    return 1 - (s.sum() - s.diag().sum()) / (len(e) * (len(e) - 1))

spreads = {"prior samples": [], "drawings of the caption": []}
with torch.no_grad():
    for c in probe:
        spreads["prior samples"].append(spread(unclip.sample_prior(pipe.prior, pipe.clip, tokenizer, [c] * K,
                                                                   PRIOR_STEPS, seed=0)))
        drawn = torch.stack([shapes.render(shapes.parse_caption(c), 64, k) for k in range(K)])
        spreads["drawings of the caption"].append(spread(pipe.embed_images(drawn)))
for c, a, b in zip(probe, *spreads.values()):
    print(f"{c:52s} prior {float(a):.4f}   drawings {float(b):.4f}")
ratio = course.mean_se(torch.stack(spreads["prior samples"]) / torch.stack(spreads["drawings of the caption"]))
print(f"prior spread / drawings' spread: {ratio[0]:.2f} ± {ratio[1]:.2f} over {len(probe)} captions")
""")

code(r"""
course.claim(ratio[0] + 2 * ratio[1] < 1,
             "the tiny prior's samples vary less than the embeddings of real drawings of the same caption",
             full_only=True, captions=len(probe), samples_each=K, spread_ratio=ratio)
""")

md(r"""
Variety is what a diffusion prior is for, and this one delivers only part of it: its samples cluster more
tightly than real drawings do — a small prior trained for minutes has learned the centre of each caption's cloud
better than its shape. DALL-E 2 judged its priors by the images people preferred, not by these numbers; here, §6 scores the images.

## 5 · The decoder: an image from an embedding

The decoder (`decoder.ImageConditionedUNet`) is the latent UNet of lesson 07 with Kandinsky 2.2's conditioning:
the 64-number image embedding becomes 4 context tokens for the cross-attention (`ImageProjection`: a linear map
and a LayerNorm) and a vector added to the time embedding (`ImageTimeEmbedding`), which reaches every block. It
was trained on the MoVQ latents of the 40,000 training images with their CLIP image embeddings and **no
captions**, dropping the embedding to zeros one time in ten for guidance. It started from `latent_text`'s UNet
(the decoder card says what that means for the comparison below).

Because it only reads an embedding, it draws **variations** of an image: embed an image with CLIP, decode.
""")

code(r"""
sources = images[[0, 3, 5, 8]]
with torch.no_grad():
    variations = pipe.variations(sources, n=4, steps=STEPS, seed=0)          # (16, 3, 64, 64)
grid = torch.cat([sources[:, None], variations.view(4, 4, 3, 64, 64)], dim=1)  # (4, 5, 3, 64, 64)
fig = viz_unclip.plot_strip(grid, ["held-out image"] + [f"variation {k + 1}" for k in range(4)],
                            "image → CLIP embedding → decoder (4 seeds)", rows=[captions[i] for i in (0, 3, 5, 8)])
""")

md(r"""
Compare each row with its source: what comes back, and what is redrawn differently? CLIP's embedding tells colour,
shape and count apart almost perfectly (§2), so whatever the variations get wrong, the decoder failed to read. The decoder
card scores this on 512 held-out images, each redrawn once from its own embedding and judged against its original
caption: the ceiling of the two-stage pipeline, since a prior can at best hand the decoder these embeddings.
""")

code(r"""
var, dec = card["decoder_tiny"]["variations"], card["decoder_tiny"]
print("redrawn from their own CLIP embedding (n = %d): " % var["prompts"]
      + ", ".join(f"{k.split('_')[1]} {var[k]:.3f}" for k in var if k.startswith("shapesbench_")))
print(f"the decoder's training (its card): {dec['steps']:,} steps in {len(dec.get('stages') or [dec])} stage(s), "
      f"{dec['wall_time_seconds'] / 60:.0f} min on {dec['hardware']['threads']} CPU thread(s), from latent_text's UNet")
""")

md(r"""
## 6 · Two stages against one

Now the whole pipeline: caption → prior (25 steps, guidance 4) → decoder (DDIM 50, guidance 4) → MoVQ, against
lesson 07's `latent_text`, which conditions the same kind of UNet on the T5 tokens of the caption and decodes
with the same MoVQ. Both cards score the same 512 fixed prompts (`train.score_prompts`); each card's sampler is
its own default.
""")

code(r"""
from kandlab import cards as kcards

keys = ["shapesbench_colour", "shapesbench_shape", "shapesbench_count", "shapesbench_position", "shapesbench_overall"]
rows = {"unCLIP (prior + decoder)": card["decoder_tiny"]["score"], "latent_text (T5 tokens)": card["latent_text"]["score"],
        "unCLIP decoder from the true embedding": card["decoder_tiny"]["variations"]}
print(f"{'':40s}" + "".join(f"{k.split('_')[1]:>14s}" for k in keys))
for name, score in rows.items():
    print(f"{name:40s}" + "".join(f"{kcards.score_cell(score, k):>14s}" for k in keys))
print("n = 512 each (position: the prompts with two groups); ± = standard error of a share")
""")

code(r"""
def share_gap(a, b, n=512):                       # a − b and the standard error of a difference of two shares
    return a - b, ((a * (1 - a) + b * (1 - b)) / n) ** 0.5

u, l = card["decoder_tiny"]["score"], card["latent_text"]["score"]
position_gap = share_gap(l["shapesbench_position"], u["shapesbench_position"], kcards.position_trials(u))
course.claim(position_gap[0] > 2 * position_gap[1],
             "the direct model places the two groups right far more often than the two-stage pipeline",
             n=kcards.position_trials(u), latent_text_position=l["shapesbench_position"], unclip_position=u["shapesbench_position"],
             gap=position_gap)
""")

md(r"""
And attribute binding, the failure Kandinsky 3's authors name: on the benchmark prompts with two groups of
different shapes, is each shape drawn in its own group's colour (**bound**), the two exchanged (**swapped**: the
right colours and shapes, on the wrong objects), or something else — a colour missing, a wrong shape
(`shapes.binding_outcomes`)?
""")

code(r"""
rates = {"unCLIP": card["decoder_tiny"]["score"]["binding"], "latent_text": card["latent_text"]["score"]["binding"],
         "unCLIP, true embedding": card["decoder_tiny"]["variations"]["binding"]}
fig = viz_unclip.plot_binding(rates, "binding on two-shape prompts (cards, one sample per prompt)")
for name, r in rates.items():
    print(f"{name:24s} bound {r['bound']:.3f}, swapped {r['swapped']:.3f} ± {r['swapped_se']:.3f}, other {r['other']:.3f} "
          f"(n = {r['n']}); swapped among the decided: {r['swap_rate_decided']:.3f}")
""")

code(r"""
v, t = rates["unCLIP, true embedding"], rates["unCLIP"]
course.claim(rates["latent_text"]["swapped"] == 0 and t["swapped"] > 2 * t["swapped_se"] and v["swapped"] > 2 * v["swapped_se"],
             "the direct model never swaps the two groups' shapes here; the decoder does in a few per cent of images, "
             "from the prior's embedding and from the true image embedding alike",
             n=t["n"], latent_text_swapped=rates["latent_text"]["swapped"], unclip_swapped=(t["swapped"], t["swapped_se"]),
             true_embedding_swapped=(v["swapped"], v["swapped_se"]))
ceiling = card["decoder_tiny"]["variations"]["shapesbench_overall"]
ceiling_gap = share_gap(l["shapesbench_overall"], ceiling)
course.claim(ceiling_gap[0] > 2 * ceiling_gap[1],
             "even from the true image embedding the decoder scores far below the direct model: at this training "
             "budget the decoder is the weak link", n=512, latent_text=l["shapesbench_overall"],
             decoder_from_true_embedding=ceiling, gap=ceiling_gap)
ceiling_se = course.share_se(ceiling, 512)
course.claim(ceiling + 2 * ceiling_se < 0.5,
             "from its own CLIP embedding, the decoder redraws fewer than half of the held-out scenes right",
             n=512, decoder_from_true_embedding=(ceiling, ceiling_se))
""")

md(r"""
What the measurements say about "why Kandinsky 3 left unCLIP", at this scale, in three parts:

* **Position** is lost on the way in. `clip_tiny`'s text tower puts a caption and its reversed twin at nearly the
  same point (§3), so the prior cannot know which group goes where; the direct model, which reads every T5 token,
  places the groups right almost every time.
* **Swaps** happen, as the Kandinsky 3 authors describe, but they are not the main failure: a few per cent of the
  two-shape prompts, and as often from the true image embedding as from the prior's — they arise where the
  decoder turns 64 numbers back into two objects, not in the prior. Most failures are "other": a missing colour,
  a wrong shape, a wrong count.
* **The decoder** is the weakest part here. After its own training (printed in §5), on top of `latent_text`'s
  UNet, it redraws colour, shape and count right in fewer than half of the held-out images even from their *true*
  embedding (the table). A pooled vector asks the decoder to recover every detail from 64
  numbers, where a text-token UNet is told them word by word.

That is the general lesson behind the design change: one pooled vector is a bottleneck, and what the contrastive
objective did not need, it does not keep; a UNet that cross-attends to every text token (Kandinsky 3, Imagen) gets
the words themselves. Which details get lost depends on the CLIP, its data and the decoder's budget — the
published CLIPs bind worse than this one, and Kandinsky 2.2's decoder trained for far longer.

Sample both live on a few prompts (same prompts, same seeds):
""")

code(r"""
prompts = train.score_prompts(N_PROMPTS)
with torch.no_grad():
    two_stage = pipe(prompts, steps=STEPS, prior_steps=PRIOR_STEPS, seed=0)
    direct = latent_pipe(prompts, steps=STEPS, seed=0, progress=False)
shown = min(8, N_PROMPTS)
fig = viz_unclip.plot_strip(torch.stack([two_stage[:shown], direct[:shown]]), [f"prompt {i}" for i in range(shown)],
                            "the same prompts: unCLIP (top) and latent_text (bottom)", rows=["unCLIP", "latent_text"])
live = {name: shapes.score(x, prompts) for name, x in (("unCLIP", two_stage), ("latent_text", direct))}
for name, s in live.items():
    print(f"{name:12s} live, n = {N_PROMPTS}: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()))
for i, p in enumerate(prompts[:shown]):
    print(i, p)
""")

md(r"""
## 7 · Mixing embeddings

Kandinsky 2.1's headline feature follows from the design: since the decoder reads any vector in CLIP's image
space, it can draw a **weighted sum** of embeddings — of images (CLIP's image tower) and of prompts (the prior's
sample) — $e = \sum_i w_i e_i$ (diffusers' `KandinskyPriorPipeline.interpolate`, which does not renormalise the
weights).

### Exercise 4 — mixing
""")

code(r"""
def my_mix(embeds: torch.Tensor, weights) -> torch.Tensor:
    # BEGIN SOLUTION
    # HINT: embeds is (K, P), weights K numbers; return the (P,) weighted sum
    w = torch.as_tensor(list(weights), dtype=embeds.dtype)
    return (w[:, None] * embeds).sum(0)
    # END SOLUTION
""")

code(r"""
course.check(my_mix, unclip.mix,
             [(torch.randn(2, 64, generator=g), [0.3, 0.7]), (torch.randn(3, 8, generator=g), [1.0, -0.5, 2.0]),
              (pipe.embed_images(images[:4]), [0.25] * 4)])
""", "nbval-check-output")

md(r"""
A straight line between two embeddings (lerp) passes closer to the origin than either end: the midpoint of two
unit vectors 90° apart has length 0.71. DALL-E 2 (§3.1) interpolates along the sphere instead (slerp,
`unclip.slerp`), keeping the norm. Two held-out images, decoded along both paths with the same seed:
""")

code(r"""
a, b = images[1], images[3]
ws = [0.0, 0.25, 0.5, 0.75, 1.0]
with torch.no_grad():
    ea, eb = pipe.embed_images(torch.stack([a, b]))
    paths = {"lerp": torch.stack([(1 - w) * ea + w * eb for w in ws]), "slerp": torch.stack([unclip.slerp(ea, eb, w) for w in ws])}
    strips = torch.stack([pipe.decode_embeddings(e, steps=STEPS, seed=0) for e in paths.values()])   # (2, 5, 3, 64, 64)
fig = viz_unclip.plot_strip(strips, [f"w = {w:g}" for w in ws], f"from “{captions[1]}” to “{captions[3]}”",
                            rows=list(paths))
norms = {name: e.norm(dim=-1) for name, e in paths.items()}
print("embedding norms along the path: " + "; ".join(f"{k}: " + ", ".join(f"{float(x):.1f}" for x in v)
                                                     for k, v in norms.items()))
""")

code(r"""
course.claim(float(norms["lerp"][2]) < min(float(norms["lerp"][0]), float(norms["lerp"][4]))
             and abs(float(norms["slerp"][2]) - (float(norms["slerp"][0]) + float(norms["slerp"][4])) / 2) < 1e-3,
             "the straight line's midpoint is shorter than both ends; slerp's midpoint has the mean of their norms",
             lerp_mid=float(norms["lerp"][2]), slerp_mid=float(norms["slerp"][2]),
             norm_a=float(norms["lerp"][0]), norm_b=float(norms["lerp"][4]))
""")

md(r"""
Mix for yourself: pick two held-out images or prompts (a prompt goes through the prior first) and a weight.
""")

code(r"""
items = {f"image: {captions[i]}"[:52]: images[i] for i in (0, 3, 5)}
items.update({"prompt: two green triangles": "two green triangles", "prompt: a large blue square": "a large blue square"})
viz_unclip.mixing_widget(pipe, items, steps=course.budget(full=25, fast=3));
""", "nbval-ignore-output")

md(r"""
## In production

| | this course | Kandinsky 2.1 | Kandinsky 2.2 |
|---|---|---|---|
| CLIP | `clip_tiny`, 64-wide, trained here | OpenAI ViT-L/14 (768) | OpenCLIP ViT-bigG/14 (1280) |
| prior | `PriorTransformer` 4 × 64, 25 steps, guidance 4 | 20 × 2048, 25 steps, guidance 4 | the same, on 1280-wide embeddings |
| decoder | K3 UNet + `ImageProjection` (4 tokens) + `ImageTimeEmbedding` | UNet with text and image conditioning | `UNet2DConditionModel`, image only (32 tokens) |
| latents | `movq_tiny`, 4×16² | MoVQ 4×64² | MoVQ 4×64² |

The prior's size is `PriorConfig.kandinsky2_2()` counted in §1; the CLIP towers' are `CLIPTextConfig.vit_bigg_14()`
and `CLIPVisionConfig.vit_bigg_14()`. `PriorTransformer.from_diffusers`, `CLIPTextTower.from_transformers` and
`CLIPImageTower.from_transformers` load the published weights (tests: `tests/test_prior.py`, `tests/test_clip.py`).

## Summary

* unCLIP generates in two stages: a prior samples a CLIP image embedding for the caption, a decoder draws it.
* CLIP's contrastive loss keeps what tells a caption from the *other captions of a batch*; here: colour, shape,
  count and their binding — not position (§2–3, measured).
* The prior is diffusion over a 64-number vector with x₀ prediction; a regression gets closer to the true
  embedding on average by predicting the mean (§4).
* The decoder needs no captions; it makes variations and mixtures of embeddings (§5, §7).
* On the same prompts the two-stage pipeline loses the relations that the direct model keeps (§6): one pooled
  vector is a bottleneck, the reason Kandinsky 3 cross-attends to every T5 token instead.

**Going further**
1. Train CLIP with hard negatives — each batch also holds every caption with its relation reversed
   (`train_unclip.train_clip`): does position retrieval rise, and does the two-stage pipeline's position score
   follow?
2. Decode the CLIP *text* embedding directly, without the prior (scaled to the image embeddings' norm): what do
   the images keep?
3. Sample the prior 16 times for one caption and measure the spread of the embeddings against the spread of the
   CLIP embeddings of 16 renderings of that caption.
""")


nb = {"cells": CELLS, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                                   "language_info": {"name": "python", "pygments_lexer": "ipython3"}},
      "nbformat": 4, "nbformat_minor": 5}
for i, cell in enumerate(nb["cells"]):
    cell["id"] = f"c{i:02d}"
OUT.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
print(f"wrote {OUT} ({len(CELLS)} cells)")
