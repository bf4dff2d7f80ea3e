"""The complete run configuration with defaults; recipes in configs/ edit it.

Every field a run reads is defined here (with a one-line comment), so an
override of a field that does not exist (``--config.optimizer.lrr=1``) fails
in ml_collections with the field's name, and ``validate`` below rejects
values that are inconsistent with each other.
"""

from __future__ import annotations

import math

import ml_collections

from alignax import objectives
from alignax import sharding
from alignax.data import sources
from alignax.data import tasks
from alignax.models import ModelConfig
from alignax.models.config import LORA_TARGETS
from alignax.objectives import causal_reward
from alignax.objectives import contrastive
from alignax.objectives import grpo


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, data order and the step rng
  c.objective = "lm"  # key of alignax.objectives.OBJECTIVES

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 0  # 0 = the tokenizer's size rounded up to a multiple of 128
  c.model.d_model = 128  # residual width
  c.model.n_layers = 4  # transformer blocks
  c.model.n_heads = 4  # query heads
  c.model.n_kv_heads = 2  # key/value heads (grouped-query attention)
  c.model.head_dim = 32  # width of one head
  c.model.d_ff = 384  # SwiGLU hidden width
  c.model.max_seq_len = 128  # longest sequence the model is used with
  c.model.rope_theta = 10000.0  # RoPE base
  c.model.norm_eps = 1e-6  # RMSNorm epsilon
  c.model.tie_embeddings = False  # share the input embedding with the LM head
  c.model.dtype = "float32"  # compute dtype: bfloat16 on TPU/GPU
  c.model.param_dtype = "float32"  # parameter dtype (keep fp32)
  c.model.remat = "none"  # a key of models.REMAT_POLICIES, or "save:<names>"
  c.model.attention = "auto"  # auto (splash on TPU, cuDNN on GPU where they fit, else blockwise) | blockwise | splash | cudnn | reference (=einsum) | fused
  c.model.attention_impl = ml_collections.config_dict.placeholder(str)  # jax.nn.dot_product_attention implementation for fused and decode: None | xla | cudnn
  # Family fields (see models.ModelConfig); an imported Hugging Face model
  # (checkpoint.init_from=HF_DIR) sets them from its config.json.
  c.model.qkv_bias = False  # biases on the q/k/v projections (Qwen2)
  c.model.qk_norm = False  # RMSNorm on q and k per head (Qwen3)
  c.model.norm_offset = 0.0  # RMSNorm multiplies by scale + offset (Gemma: 1)
  c.model.mlp_activation = "silu"  # gate nonlinearity: silu | gelu_tanh | gelu
  c.model.embed_scale = False  # embeddings times sqrt(d_model) (Gemma)
  c.model.post_norms = False  # norms on the attention/MLP outputs too (Gemma 2)
  c.model.attn_scale = 0.0  # query-key scale (0 = 1/sqrt(head_dim))
  c.model.attn_logit_softcap = 0.0  # c*tanh(s/c) on attention scores (0 = off)
  c.model.final_logit_softcap = 0.0  # the same on the output logits (0 = off)
  c.model.layer_windows = ()  # sliding window per layer (() = all full, 0 = full)
  c.model.rope_scaling = "none"  # none | linear | llama3
  c.model.rope_factor = 1.0  # context-extension factor of linear/llama3
  c.model.rope_low_freq_factor = 1.0  # llama3 low-frequency factor
  c.model.rope_high_freq_factor = 4.0  # llama3 high-frequency factor
  c.model.rope_original_max_len = 8192  # llama3 pretraining context length
  c.model.scan_layers = True  # False unrolls the layer loop (longer compiles)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # pure data-parallel ways
  c.mesh.fsdp = -1  # parameter-sharded data-parallel ways (-1 = the rest)
  c.mesh.tensor = 1  # tensor-parallel ways
  c.sharding_rules = tuple(sharding.DEFAULT_RULES)  # logical axis -> mesh axes

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # only AdamW for now
  c.optimizer.lr = 3e-3  # peak learning rate
  c.optimizer.warmup_steps = 20  # linear warmup from 0
  c.optimizer.final_lr_ratio = 0.1  # cosine decays to lr * this
  c.optimizer.b1 = 0.9  # Adam beta1
  c.optimizer.b2 = 0.95  # Adam beta2
  c.optimizer.eps = 1e-8  # Adam epsilon
  c.optimizer.weight_decay = 0.1  # decoupled weight decay on matrices
  c.optimizer.grad_clip_norm = 1.0  # global-norm clipping (0 = off)
  c.optimizer.schedule_steps = 0  # length of the lr schedule (0 = train.steps)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300  # optimizer steps
  c.train.batch_size = 16  # global batch (rows) per optimizer step
  c.train.seq_len = 128  # tokens per row
  c.train.microbatches = 1  # gradient accumulation splits of the batch
  c.train.log_every = 10  # steps between metrics.jsonl lines
  c.train.eval_every = 100  # steps between held-out evaluations (0 = never)
  c.train.eval_batches = 8  # held-out batches per evaluation
  c.train.on_nonfinite = "stop"  # stop | skip: what a NaN/Inf step does
  c.train.loss_scaling = False  # dynamic loss scaling (for float16 compute)
  c.train.z_loss = 0.0  # z-loss coefficient of the LM cross-entropy
  c.train.progress_bar = True  # tqdm bar on process 0
  c.train.profile_steps = 0  # steps traced by the jax profiler into workdir/profile (0 = none; view with TensorBoard's profile plugin or Perfetto)
  c.train.profile_start = 3  # first traced step (after compilation)

  c.wandb = ml_collections.ConfigDict()  # Weights & Biases logging (pip install wandb), beside metrics.jsonl and TensorBoard
  c.wandb.project = ""  # W&B project ("" = no W&B)
  c.wandb.entity = ""  # W&B entity (team or user; "" = the default)
  c.wandb.name = ""  # run name ("" = the workdir's name)
  c.wandb.mode = "online"  # online | offline (sync later with `wandb sync`) | disabled
  c.wandb.tags = ()  # run tags

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.save_every = 100  # steps between checkpoints
  c.checkpoint.keep = 2  # checkpoints kept
  c.checkpoint.async_save = True  # write in the background
  c.checkpoint.init_from = ""  # start a new run from these parameters (workdir/step dir)

  c.reference = "none"  # none | frozen: the policy's starting params as a frozen model | base: the policy with its LoRA adapters off (needs lora.enabled; no copy)

  c.curriculum = ml_collections.ConfigDict()  # Curry-DPO (python -m alignax.curriculum): ranked pairs of graded lists, trained easy to hard
  c.curriculum.stages = 3  # stages; a prompt's pair of gap rank i goes to stage min(i, stages - 1), the reference is the stage's start
  c.curriculum.pairing = "best_vs_rest"  # best_vs_rest (the paper's) | all (every two responses with different scores)

  c.lora = ml_collections.ConfigDict()  # LoRA adapters (alignax.models.lora): only they and any head are trained, the base is frozen
  c.lora.enabled = False  # add adapters to the targeted kernels
  c.lora.rank = 8  # adapter rank r
  c.lora.alpha = 16.0  # adapters add (alpha / r) x A B (rslora: alpha / sqrt(r))
  c.lora.rslora = False  # rank-stabilised scaling alpha / sqrt(r)
  c.lora.dropout = 0.0  # dropout on each adapter's input in train steps (PEFT's lora_dropout; not with GradCache)
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # kernels that get adapters (attention q/k/v/o, MLP gate/up/down)
  c.lora.quant = "none"  # none | int8 | nf4: block kernels stored quantized, dequantized in the matmul (QLoRA)
  c.lora.save_base = True  # False: checkpoints hold only adapters, heads and their optimizer state, and name the base (checkpoint.init_from), which resume and loading reread

  c.preference = ml_collections.ConfigDict()  # preference objectives (dpo, lipo, kto, ...)
  c.preference.beta = 0.1  # inverse temperature of the implicit reward beta*log(pi/pi_ref)
  c.preference.loss_type = "sigmoid"  # dpo: TRL loss_type, or several joined by commas
  c.preference.loss_weights = ()  # dpo: weight per loss_type entry (() = all 1)
  c.preference.label_smoothing = 0.0  # robust / exo_pair (epsilon) / aot / cpo / simpo label smoothing (TRL)
  c.preference.f_divergence = "reverse_kl"  # reverse_kl | forward_kl | js_divergence | alpha_divergence
  c.preference.alpha_divergence_coef = 0.5  # alpha of f_divergence='alpha_divergence'
  c.preference.discopop_tau = 0.05  # temperature of loss_type='discopop'
  c.preference.simpo_gamma = 0.5  # simpo: target reward margin
  c.preference.ld_alpha = 1.0  # pairs: LD-DPO (TRL ld_alpha) weight of the longer answer's tokens past the shorter one's length (1 = plain DPO)
  c.preference.use_weighting = False  # dpo: WPO (TRL use_weighting): each pair's loss times the policy's length-normalised, calibrated probability of both answers (no gradient)
  c.preference.sync_ref_model = False  # TR-DPO (TRL sync_ref_model): every ref_model_sync_steps steps the frozen reference becomes alpha * policy + (1 - alpha) * reference (needs reference='frozen')
  c.preference.ref_model_mixup_alpha = 0.6  # TR-DPO alpha in (0, 1] (1 = copy the policy); TRL's default
  c.preference.ref_model_sync_steps = 512  # TR-DPO tau: optimizer steps between reference updates; TRL's default
  c.preference.sft_weight = 0.0  # chosen NLL weight (TRL rpo_alpha / cpo_alpha; npo: retain NLL)
  c.preference.list_loss = "lipo_lambda"  # lipo: lipo_lambda | list_mle | list_softmax | pairwise_logistic | pairwise_hinge
  c.preference.lambda_normalize = False  # lipo_lambda: divide gains by the ideal DCG
  c.preference.reward_center_coef = 0.0  # reward_model: TRL center_rewards_coefficient
  c.preference.kto_desirable_weight = 1.0  # kto: lambda_D
  c.preference.kto_undesirable_weight = 1.0  # kto: lambda_U
  c.preference.modpo_weights = (1.0,)  # modpo: [w_0, w_1..w_M], M = len(data.preference.reward_fields)
  c.preference.cache_reference = False  # precompute reference log-probs before training (alignax.reference)
  c.preference.reference_cache_dir = ""  # root of reference caches ("" = workdir/reference_cache)
  c.preference.logps_chunk = 0  # sequence chunk of the log-prob computation (0 = whole rows)

  c.reward = ml_collections.ConfigDict()  # multi-objective (multi_reward, reward_gate: ArmoRM) and causal (causal_reward) reward models
  c.reward.gate_hidden = 64  # multi_reward/reward_gate: width of the gate MLP on the prompt's last hidden state
  c.reward.gate_beta = 1.0  # reward_gate: initial Bradley-Terry scale beta of the gated mixture (learned)
  c.reward.verbosity_attribute = ""  # reward_gate: attribute that measures verbosity; the others are decorrelated from it before training ("" = no decorrelation)
  c.reward.decorrelation = "spearman"  # spearman (ArmoRM) | pearson: which correlation with verbosity the fitted lambdas zero
  c.reward.reference_size = 2048  # reward_gate: training responses the decorrelation is fitted on
  c.reward.mmd_weight = 0.0  # causal_reward: weight lambda of the MMD penalty (0 = plain Bradley-Terry)
  c.reward.spurious = "length"  # causal_reward: length (response tokens) or a name in data.preference.reward_fields
  c.reward.bins = ()  # causal_reward: bin edges of the spurious attribute (() = num_bins in-batch quantiles for length, the integer value for a field)
  c.reward.num_bins = 4  # causal_reward: bins when reward.bins is ()
  c.reward.mmd_bandwidth = 0.0  # causal_reward: Gaussian kernel sigma (0 = median heuristic)
  c.reward.mmd_conditional = False  # causal_reward: compare bins within chosen and within rejected responses (conditional CRM)
  c.reward.mmd_features = "hidden"  # causal_reward: hidden (the reward head's input) | reward (the scalar reward)

  c.grpo = ml_collections.ConfigDict()  # online policy-gradient objectives (grpo, rloo, disco) on rollout batches (alignax.objectives.grpo); TRL GRPOConfig names
  c.grpo.loss_type = "dapo"  # grpo: grpo | dr_grpo | dapo | bnpo | cispo | sapo (TRL's default dapo)
  c.grpo.num_generations = 8  # G completions sampled per prompt (one group)
  c.grpo.epsilon = 0.2  # lower clip range: ratios below 1 - epsilon are clipped
  c.grpo.epsilon_high = ml_collections.config_dict.placeholder(float)  # upper clip range (None = epsilon; DAPO: 0.28); cispo: the ratio cap (ScaleRL: 5.0)
  c.grpo.delta = ml_collections.config_dict.placeholder(float)  # INTELLECT-2 two-sided clip: cap of the unclipped ratio (None = off; > 1 + epsilon_high)
  c.grpo.beta = 0.0  # grpo: k3 KL-to-reference coefficient (0 = no reference); rloo: KL-in-reward coefficient
  c.grpo.importance_sampling_level = "token"  # token | sequence (GSPO: length-normalised sequence ratio)
  c.grpo.scale_rewards = "group"  # advantages: group | batch | none (Dr. GRPO: no std scaling)
  c.grpo.normalize_advantages = False  # rloo: standardise the leave-one-out advantages over the batch
  c.grpo.num_iterations = 1  # optimizer steps per generated batch (mu); old log-probs kept across them
  c.grpo.max_completion_length = 64  # tokens sampled per completion (dr_grpo's normaliser)
  c.grpo.temperature = 1.0  # sampling temperature; log-probs are log softmax(logits / temperature)
  c.grpo.sapo_temperature_pos = 1.0  # sapo: gate temperature for positive advantages
  c.grpo.sapo_temperature_neg = 1.05  # sapo: gate temperature for the others
  c.grpo.logps_chunk = 0  # sequence chunk of the fused log-prob computation (0 = whole rows)
  c.grpo.prompts_per_step = 0  # alignax.rl: prompts per rollout step; sets train.batch_size = prompts_per_step * num_generations (0 = train.batch_size // num_generations)
  c.grpo.task = "code"  # alignax.rl: code (alignax.data.code_task, doctests in the sandbox) | function (alignax.data.function_task, one-line bodies, unit tests in the sandbox) | docstring (alignax.onpolicy.DocstringTask, name similarity)
  c.grpo.prompt_mode = ""  # alignax.rl: "" = [BOS] + prompt, causal | a UL2 mode token ("[S2S]") = [mode] + prompt read as a prefix-LM prefix
  c.grpo.reward_model = ""  # alignax.rl: reward-model workdir whose score is one more reward ("" = the task's reward only)
  c.grpo.reward_weights = ()  # alignax.rl: one weight per reward (the task's, then the reward model's); () = all 1
  c.grpo.reward_combine = "sum"  # alignax.rl: sum (weighted sum, then the objective's advantages) | gdpo (each reward normalised in its group first; grpo only)
  c.grpo.mask_truncated_completions = False  # alignax.rl: weights 0 on completions that never reached a stop token (TRL's name)
  c.grpo.eval_prompts = 16  # alignax.rl: held-out prompts of the greedy evaluation (every train.eval_every steps)
  c.grpo.train_prompts = 0  # alignax.rl: training prompts drawn from (the first N of the task's seeded order; 0 = all)
  c.grpo.sandbox_workers = 0  # alignax.rl, task code: concurrent sandbox runs (0 = os.cpu_count())
  c.grpo.disco = ml_collections.ConfigDict()  # objective='disco' (Li et al., 2025)
  c.grpo.disco.score = "log_l"  # log_l (mean token log-likelihood) | l_ratio (mean token pi / pi_old)
  c.grpo.disco.tau = 10.0  # DRO temperature over the negatives (0 = DisCO-b: their mean)
  c.grpo.disco.beta = 500.0  # squared-hinge weight beta [KL(pi_old||pi) - delta]_+^2 (the authors' 1e3 in their beta/2 form)
  c.grpo.disco.delta = 1e-4  # KL(pi_old || pi) budget
  c.grpo.grace = ml_collections.ConfigDict()  # grpo.task='grace' (alignax.grace, Sun et al., 2025): rationales scored by contrastive similarity of their embeddings
  c.grpo.grace.reward = "grace"  # grace (the authors' terms) | infonce (each sample's log-softmax over the side's partner anchors: alignax.rewards.grace.infonce_rewards)
  c.grpo.grace.temperature = 0.1  # tau: the similarity terms are divided by it (the authors' train.sh)
  c.grpo.grace.clustering_weight = 0.2  # w_c: mean similarity of a sample to the other samples of its group
  c.grpo.grace.cross_group_weight = 0.2  # w_x: minus the mean over other groups of their most similar sample (in-batch negatives)
  c.grpo.grace.length_penalty = True  # a rationale that never stops gets reward -1 (the authors' enable_length_penalty)
  c.grpo.grace.anchor_temperature = 0.5  # one anchor rationale per text, sampled at this temperature (0 = greedy), that its partner's samples are scored against
  c.grpo.grace.train_queries = True  # sample and train G rationales of each query too (False: documents only, as the authors)
  c.grpo.grace.pool = "text_and_rationale"  # text_and_rationale (the authors: the text and its rationale, template excluded) | rationale
  c.grpo.grace.eval_pairs = 0  # held-out docstring -> code pairs of the retrieval evaluation (0 = all)

  c.contrastive = ml_collections.ConfigDict()  # contrastive / cafe objectives
  c.contrastive.loss = "clip"  # clip | siglip | infonce (MNRL: hard negatives as columns) | mv_infonce | dcl | dhel | mv_dhel | symile
  c.contrastive.pooling = "last"  # last | mean | first token of each text
  c.contrastive.proj_dim = 0  # linear projection after pooling (0 = none)
  c.contrastive.normalize = True  # L2-normalise the embeddings
  c.contrastive.temperature = 0.0  # initial 1/t (0 = the loss's: CLIP 0.07, SigLIP 0.1)
  c.contrastive.learn_temperature = True  # train the log logit scale
  c.contrastive.max_logit_scale = 100.0  # clamp of the logit scale t (CLIP's 100)
  c.contrastive.bias = -10.0  # initial SigLIP bias b
  c.contrastive.bidirectional = False  # bidirectional attention within each text
  c.contrastive.matryoshka_dims = ()  # Matryoshka truncation dims (() = off)
  c.contrastive.chunk_size = 0  # GradCache sub-batch, in texts (0 = no caching)
  c.contrastive.ring = False  # ring shard_map CLIP/SigLIP over the batch axes
  c.contrastive.weight = 1.0  # cafe: weight of the contrastive loss
  c.contrastive.lm_weight = 1.0  # cafe: weight of the LM loss

  c.data = ml_collections.ConfigDict()
  c.data.task = "lm"  # key of alignax.data.tasks.DATA_TASKS: how records become batches
  c.data.source = "embedded"  # embedded | jsonl | parquet | array_record | tfds | hf
  c.data.paths = ()  # files of the train split (jsonl/parquet/array_record)
  c.data.eval_paths = ()  # files of the held-out split
  c.data.eval_fraction = 0.0  # file and hf sources without an eval split: share of the train records held out
  c.data.text_field = "text"  # record field holding the text
  c.data.tfds_name = ""  # TFDS dataset name (source=tfds)
  c.data.tfds_data_dir = ""  # TFDS data_dir (source=tfds)
  c.data.hf_path = ""  # source=hf: a datasets save_to_disk directory, a Hub-layout folder (Parquet/JSON files), or 'memory:NAME' (alignax.data.sources.register_hf_dataset)
  c.data.hf_train_split = "train"  # source=hf: split to train on
  c.data.hf_eval_split = "test"  # source=hf: held-out split (or data.eval_fraction)
  c.data.skip_malformed = False  # count and skip bad records instead of failing
  c.data.num_shards = 0  # fixed record shards of the global batch (0 = one per process); > 0 makes batches and resumes independent of the process count
  c.data.heldout_fraction = 0.02  # embedded corpus: share of documents held out
  c.data.add_bos = False  # prepend BOS to every document
  c.data.ul2 = ml_collections.ConfigDict()  # UL2 mixture (data.task='ul2')
  c.data.ul2.preset = "ul2"  # ul2 (UL2 Table 1, 7 denoisers) | ul2r (U-PaLM, 4)
  c.data.ul2.denoisers = ()  # e.g. ("R(0.15,3)", "X(0.5,64)", "S(0.25)"); () = preset
  c.data.ul2.rates = ()  # mixing weight per denoiser; () = uniform (as the paper)
  c.data.ul2.s_split = "fixed"  # fixed (paper: last 25% target) | uniform (T5)
  c.data.preference = ml_collections.ConfigDict()  # preference records (data.task='preference')
  c.data.preference.format = "pairs"  # pairs | lists | binary (see alignax.data.preference)
  c.data.preference.list_size = 4  # K responses per list (lists; draws of the embedded task)
  c.data.preference.groups_per_row = 4  # most examples (pairs/lists) packed into one row
  c.data.preference.shared_prompt = True  # encode each prompt once; responses attend to it
  c.data.preference.max_prompt_len = 64  # prompt tokens kept, from the end (keep_end)
  c.data.preference.max_response_len = 64  # response tokens kept, from the start
  c.data.preference.max_length = 0  # TRL's max_length (0 = off): each prompt + response cut to this many tokens from the start, replacing max_prompt_len / max_response_len; train.seq_len must hold K x (max_length - 1)
  c.data.preference.reward_fields = ()  # modpo: score fields of the other objectives
  c.data.preference.task_repeats = 4  # embedded task: distractor draws per function
  c.data.preference.reference_cache = ""  # dir of cached reference log-probs (set by alignax.reference)
  c.data.preference.chat_template = ""  # "" = built-in; HF model dir, tokenizer_config.json or .jinja
  c.data.preference.attributes = ()  # ratings / multi_reward / reward_gate: attribute names, one regression head each
  c.data.preference.embedded_task = "names"  # embedded preference source: names (alignax.data.preference_task) | attributes (alignax.data.attribute_task, pairs)
  c.data.preference.task_length_bias = 0.85  # embedded attributes task: share of train pairs whose chosen response is the longer (held-out: 0.5)

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "sentencepiece"  # sentencepiece (trained on first use) | hf
  c.tokenizer.vocab_size = 2048  # base SentencePiece vocabulary
  c.tokenizer.num_sentinels = 100  # reserved <extra_id_i> ids at the top
  c.tokenizer.path = ""  # tokenizer.json for kind=hf
  c.tokenizer.cache_dir = ""  # where the trained model is cached ("" = workdir/tokenizer)
  return c


_finite = lambda v: isinstance(v, (int, float)) and not isinstance(
    v, bool) and math.isfinite(v)
_positive = lambda v: _finite(v) and v > 0
_non_negative = lambda v: _finite(v) and v >= 0
_positive_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and (
    v > 0)
_non_negative_int = lambda v: isinstance(v, int) and not isinstance(
    v, bool) and v >= 0
_fraction = lambda v: _finite(v) and 0 <= v < 1

# field -> (check, what a valid value is). Values that no run can use, found
# before anything is built or written.
VALUE_CHECKS = {
    "train.profile_steps": (_non_negative_int, "an integer >= 0"),
    "train.profile_start": (_non_negative_int, "an integer >= 0"),
    "seed": (_non_negative_int, "an integer >= 0"),
    "optimizer.lr": (_non_negative, "a finite number >= 0"),
    "optimizer.warmup_steps": (_non_negative_int, "an integer >= 0"),
    "optimizer.final_lr_ratio": (_non_negative, "a finite number >= 0"),
    "optimizer.b1": (_fraction, "in [0, 1)"),
    "optimizer.b2": (_fraction, "in [0, 1)"),
    "optimizer.eps": (_positive, "a finite number > 0"),
    "optimizer.weight_decay": (_non_negative, "a finite number >= 0"),
    "optimizer.grad_clip_norm": (_non_negative, "a finite number >= 0 (0 = off)"),
    "optimizer.schedule_steps": (_non_negative_int, "an integer >= 0"),
    "train.steps": (_positive_int, "an integer > 0"),
    "train.batch_size": (_positive_int, "an integer > 0"),
    "train.seq_len": (_positive_int, "an integer > 0"),
    "train.microbatches": (_positive_int, "an integer > 0"),
    "train.log_every": (_positive_int, "an integer > 0"),
    "train.eval_every": (_non_negative_int, "an integer >= 0 (0 = never)"),
    "train.eval_batches": (_positive_int, "an integer > 0"),
    "train.z_loss": (_non_negative, "a finite number >= 0"),
    "checkpoint.save_every": (_positive_int, "an integer > 0"),
    "checkpoint.keep": (_positive_int, "an integer > 0"),
    "preference.beta": (_positive, "a finite number > 0"),
    "lora.rank": (_positive_int, "an integer > 0"),
    "curriculum.stages": (_positive_int, "an integer > 0"),
    "lora.alpha": (_positive, "a finite number > 0"),
    "lora.dropout": (_fraction, "in [0, 1)"),
    "preference.label_smoothing": (_fraction, "in [0, 1)"),
    "preference.ld_alpha": (lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]"),
    "preference.ref_model_mixup_alpha": (lambda v: _finite(v) and 0 < v <= 1,
                                         "in (0, 1]"),
    "preference.ref_model_sync_steps": (_positive_int, "an integer > 0"),
    "preference.sft_weight": (_non_negative, "a finite number >= 0"),
    "preference.logps_chunk": (_non_negative_int, "an integer >= 0"),
    "grpo.num_generations": (lambda v: _positive_int(v) and v >= 2,
                             "an integer >= 2 (a group needs two samples)"),
    "grpo.epsilon": (_positive, "a finite number > 0"),
    "grpo.epsilon_high": (lambda v: v is None or _positive(v),
                          "None (= epsilon) or a finite number > 0"),
    "grpo.delta": (lambda v: v is None or (_finite(v) and v > 1),
                   "None (off) or a finite number > 1"),
    "grpo.beta": (_non_negative, "a finite number >= 0"),
    "grpo.num_iterations": (_positive_int, "an integer > 0"),
    "grpo.max_completion_length": (_positive_int, "an integer > 0"),
    "grpo.temperature": (_positive, "a finite number > 0"),
    "grpo.sapo_temperature_pos": (_positive, "a finite number > 0"),
    "grpo.sapo_temperature_neg": (_positive, "a finite number > 0"),
    "grpo.logps_chunk": (_non_negative_int, "an integer >= 0"),
    "grpo.prompts_per_step": (_non_negative_int, "an integer >= 0"),
    "grpo.eval_prompts": (_non_negative_int, "an integer >= 0"),
    "grpo.train_prompts": (_non_negative_int, "an integer >= 0"),
    "grpo.sandbox_workers": (_non_negative_int, "an integer >= 0 (0 = all cores)"),
    "grpo.reward_weights": (lambda v: all(_finite(w) for w in v),
                            "finite numbers, one per reward"),
    "grpo.disco.tau": (_non_negative, "a finite number >= 0 (0 = DisCO-b)"),
    "grpo.disco.beta": (_non_negative, "a finite number >= 0"),
    "grpo.disco.delta": (_non_negative, "a finite number >= 0"),
    "grpo.grace.temperature": (_positive, "a finite number > 0"),
    "grpo.grace.clustering_weight": (_finite, "a finite number"),
    "grpo.grace.cross_group_weight": (_finite, "a finite number"),
    "grpo.grace.anchor_temperature": (_non_negative, "a finite number >= 0 (0 = greedy)"),
    "grpo.grace.eval_pairs": (_non_negative_int, "an integer >= 0 (0 = all)"),
    "reward.gate_hidden": (_positive_int, "an integer > 0"),
    "reward.gate_beta": (_positive, "a finite number > 0"),
    "reward.reference_size": (_positive_int, "an integer > 0"),
    "reward.mmd_weight": (_non_negative, "a finite number >= 0"),
    "reward.num_bins": (lambda v: _positive_int(v) and v >= 2,
                        "an integer >= 2"),
    "reward.mmd_bandwidth": (_non_negative, "a finite number >= 0 (0 = median)"),
    "data.preference.max_prompt_len": (_positive_int, "an integer > 0"),
    "data.preference.max_response_len": (_positive_int, "an integer > 0"),
    "data.preference.max_length": (lambda v: isinstance(v, int) and (v == 0 or v >= 2),
                                   "0 (off) or an integer >= 2"),
    "data.preference.task_length_bias": (lambda v: _finite(v) and 0 <= v <= 1,
                                         "in [0, 1]"),
    "data.heldout_fraction": (_fraction, "in [0, 1)"),
    "data.eval_fraction": (_fraction, "in [0, 1)"),
    "data.num_shards": (_non_negative_int, "an integer >= 0 (0 = per process)"),
    "tokenizer.vocab_size": (_positive_int, "an integer > 0"),
    "tokenizer.num_sentinels": (_non_negative_int, "an integer >= 0"),
}
CHOICES = {
    "wandb.mode": ("online", "offline", "disabled"),
    "train.on_nonfinite": ("stop", "skip"),
    "curriculum.pairing": ("best_vs_rest", "all"),
    "reference": ("none", "frozen", "base"),
    "lora.quant": ("none", "int8", "nf4"),
    "data.source": sources.SOURCES,
    "tokenizer.kind": ("sentencepiece", "hf"),
    "optimizer.name": ("adamw",),
    "reward.decorrelation": ("spearman", "pearson"),
    "reward.mmd_features": causal_reward.FEATURES,
    "data.preference.embedded_task": ("names", "attributes"),
    "grpo.loss_type": grpo.GRPO_LOSS_TYPES,
    "grpo.importance_sampling_level": grpo.IMPORTANCE_SAMPLING_LEVELS,
    "grpo.scale_rewards": grpo.SCALE_REWARDS,
    "grpo.disco.score": grpo.DISCO_SCORES,
    "grpo.task": ("code", "function", "docstring", "grace"),
    "grpo.grace.pool": ("text_and_rationale", "rationale"),
    "grpo.grace.reward": ("grace", "infonce"),
    "grpo.reward_combine": ("sum", "gdpo"),
}


def _get(c, field):
  for key in field.split("."):
    c = c[key]
  return c


def check_values(c: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the field for a value no run can use.

  Needs no devices and builds nothing: the launcher and ``train.run`` call
  it before any model is built or any file is written.
  """
  for field, (ok, want) in VALUE_CHECKS.items():
    value = _get(c, field)
    if not ok(value):
      raise ValueError(f"config.{field}={value!r} must be {want}")
  for field, choices in CHOICES.items():
    value = _get(c, field)
    if value not in choices:
      raise ValueError(f"config.{field}={value!r}: use one of {list(choices)}")
  objectives.spec(c.objective)  # one-line errors naming the known values
  tasks.task(c.data.task)
  _check_grpo(c)
  _check_reward(c)
  _check_wpo_and_tr_dpo(c)
  d = c.data
  if (d.source in ("jsonl", "parquet", "array_record") and c.train.eval_every
      and not d.eval_paths and not d.eval_fraction):
    raise ValueError(
        f"config.data.source={d.source!r} with config.train.eval_every="
        f"{c.train.eval_every} needs held-out data: set config.data."
        "eval_paths, or config.data.eval_fraction (e.g. 0.01) to hold out "
        "part of data.paths, or config.train.eval_every=0")
  if d.preference.max_length and c.data.task == "preference":
    # A group of K sequences of at most max_length tokens (prompt + response,
    # as TRL counts them) needs at most K (max_length - 1) row positions,
    # shared prompt or not (a 1-token prompt is the worst case).
    k = d.preference.list_size if d.preference.format == "lists" else 2
    need = k * (d.preference.max_length - 1)
    if c.train.seq_len < need:
      raise ValueError(
          f"config.train.seq_len={c.train.seq_len} cannot hold {k} responses of "
          f"config.data.preference.max_length={d.preference.max_length} (prompt + "
          f"response, TRL's max_length): use seq_len >= {need}")
  fields = dict(c.model)
  fields["vocab_size"] = fields["vocab_size"] or 128  # 0 = the tokenizer's
  try:
    ModelConfig(**fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from None


def _check_reward(c: ml_collections.ConfigDict) -> None:
  """``config.reward`` and the data the reward-model objectives read."""
  name, d = f"config.objective={c.objective!r}", c.data
  attributes = tuple(d.preference.attributes)
  wants = {"multi_reward": "ratings", "reward_gate": "preference",
           "causal_reward": "preference"}
  if c.objective in wants and d.task != wants[c.objective]:
    raise ValueError(f"{name} reads config.data.task={wants[c.objective]!r} "
                     f"batches, not {d.task!r}")
  if d.task == "ratings" and c.objective != "multi_reward":
    raise ValueError(f"config.data.task='ratings' trains "
                     f"objective='multi_reward', not {c.objective!r}")
  if c.objective in ("multi_reward", "reward_gate") and (
      not attributes or len(set(attributes)) != len(attributes)):
    raise ValueError(f"{name} needs config.data.preference.attributes: "
                     f"distinct attribute names, got {attributes}")
  verbose = c.reward.verbosity_attribute
  if c.objective == "reward_gate" and verbose and verbose not in attributes:
    raise ValueError(f"config.reward.verbosity_attribute={verbose!r} is not "
                     f"one of config.data.preference.attributes={attributes}")
  if c.objective != "causal_reward":
    return
  fields = tuple(d.preference.reward_fields)
  if c.reward.spurious != "length" and c.reward.spurious not in fields:
    raise ValueError(f"config.reward.spurious={c.reward.spurious!r}: use "
                     "'length' or a name in config.data.preference."
                     f"reward_fields={fields}")
  bins = tuple(c.reward.bins)
  if any(not _finite(b) for b in bins) or any(
      b >= a for b, a in zip(bins, bins[1:])):
    raise ValueError(f"config.reward.bins={bins} must be increasing finite "
                     "bin edges (or () for quantile / value bins)")


def _check_wpo_and_tr_dpo(c: ml_collections.ConfigDict) -> None:
  """``preference.use_weighting`` (WPO) and ``sync_ref_model`` (TR-DPO)."""
  p = c.preference
  if p.use_weighting and c.objective != "dpo":
    raise ValueError(f"config.preference.use_weighting=True (WPO) weights "
                     f"TRL's DPO losses: use it with objective 'dpo', not "
                     f"{c.objective!r}")
  if not p.sync_ref_model:
    return
  what = "config.preference.sync_ref_model=True (TR-DPO)"
  if p.cache_reference:
    raise ValueError(f"{what} updates the reference during training, so its "
                     "log-probs cannot be precomputed: set config.preference."
                     "cache_reference=False and config.reference='frozen'")
  if c.lora.enabled:
    raise ValueError(f"{what} is not supported with LoRA (as in TRL): mixing "
                     "adapter factors does not mix the models; set "
                     "config.lora.enabled=False")
  if c.reference != "frozen":
    raise ValueError(f"{what} updates the frozen reference copy: set "
                     f"config.reference='frozen' (got {c.reference!r})")


def _check_grpo(c: ml_collections.ConfigDict) -> None:
  """``config.grpo`` against the rest, for the rollout objectives."""
  if c.objective not in ("grpo", "rloo", "disco"):
    return
  g, name = c.grpo, f"config.objective={c.objective!r}"
  if c.train.batch_size % g.num_generations:
    raise ValueError(f"{name}: config.train.batch_size={c.train.batch_size} "
                     "must be a multiple of config.grpo.num_generations="
                     f"{g.num_generations} (whole groups of samples)")
  if c.objective == "disco" and c.train.microbatches != 1:
    raise ValueError(f"{name} compares the samples of a group and bounds the "
                     "batch KL: set config.train.microbatches=1 (got "
                     f"{c.train.microbatches})")
  if g.max_completion_length >= c.train.seq_len:
    raise ValueError(f"config.grpo.max_completion_length="
                     f"{g.max_completion_length} leaves no room for a prompt "
                     f"in config.train.seq_len={c.train.seq_len}")
  if g.temperature != 1.0 and c.model.final_logit_softcap:
    raise ValueError(f"config.grpo.temperature={g.temperature} with "
                     "config.model.final_logit_softcap > 0 is not supported: "
                     "set grpo.temperature=1.0")


def validate(c: ml_collections.ConfigDict, *, num_devices: int,
             batch_ways: int) -> None:
  """Raises ``ValueError`` naming the field for inconsistent settings."""
  check_values(c)
  t = c.train
  if t.microbatches <= 0 or t.batch_size % t.microbatches:
    raise ValueError(f"config.train.batch_size={t.batch_size} must be a "
                     f"multiple of config.train.microbatches={t.microbatches}")
  if (t.batch_size // t.microbatches) % batch_ways:
    raise ValueError(
        f"config.train.batch_size={t.batch_size} / microbatches="
        f"{t.microbatches} must divide over the {batch_ways} data x fsdp "
        f"ways of the mesh ({num_devices} devices)")
  shards = c.data.num_shards
  if shards and t.batch_size % shards:
    raise ValueError(f"config.data.num_shards={shards} must divide "
                     f"config.train.batch_size={t.batch_size}")
  if t.seq_len > c.model.max_seq_len:
    raise ValueError(f"config.train.seq_len={t.seq_len} exceeds "
                     f"config.model.max_seq_len={c.model.max_seq_len}")
  p, dp = c.preference, c.data.preference
  _validate_lora(c)
  if p.cache_reference and c.reference == "frozen":
    raise ValueError("config.preference.cache_reference=True replaces the frozen "
                     "reference: set config.reference='none'")
  if dp.format not in ("pairs", "lists", "binary"):
    raise ValueError(f"config.data.preference.format={dp.format!r}: use "
                     "'pairs', 'lists' or 'binary'")
  if dp.list_size < 2 or dp.groups_per_row < 1:
    raise ValueError(f"config.data.preference.list_size={dp.list_size} must be "
                     f">= 2 and groups_per_row={dp.groups_per_row} >= 1")
  _validate_contrastive(c, batch_ways)


def _validate_lora(c: ml_collections.ConfigDict) -> None:
  """``config.lora`` and ``config.reference='base'`` checks."""
  if c.reference == "base" and not c.lora.enabled:
    raise ValueError("config.reference='base' is the policy with its LoRA "
                     "adapters switched off: set config.lora.enabled=True "
                     "(or use reference='frozen')")
  if c.reference == "base" and c.preference.cache_reference:
    raise ValueError("config.preference.cache_reference=True replaces the "
                     "base reference: set config.reference='none'")
  if not c.lora.save_base and not (c.lora.enabled and c.checkpoint.init_from):
    raise ValueError("config.lora.save_base=False leaves the frozen base out "
                     "of checkpoints: it needs config.lora.enabled=True and "
                     "the base in config.checkpoint.init_from")
  if c.lora.quant != "none" and not c.lora.enabled:
    raise ValueError(f"config.lora.quant={c.lora.quant!r} stores the frozen "
                     "base quantized under LoRA: set config.lora.enabled=True")
  if (c.lora.quant != "none" and c.objective in ("contrastive", "cafe")
      and c.contrastive.chunk_size):
    # GradCache differentiates the whole model inside its custom VJP; an
    # int8/nf4 kernel cannot be. (Differentiating only the adapters there
    # made the 8-device CPU step deadlock in a collective.)
    raise ValueError(f"config.lora.quant={c.lora.quant!r} with "
                     "config.contrastive.chunk_size > 0 (GradCache) is not "
                     "supported: set chunk_size=0 or lora.quant='none'")
  if (c.lora.enabled and c.lora.dropout and c.objective in ("contrastive", "cafe")
      and c.contrastive.chunk_size):
    # GradCache recomputes each sub-batch in its backward pass, traced after
    # the step's dropout key is gone: the two passes would disagree.
    raise ValueError(f"config.lora.dropout={c.lora.dropout} with "
                     "config.contrastive.chunk_size > 0 (GradCache) is not "
                     "supported: set chunk_size=0 or lora.dropout=0")
  targets = tuple(c.lora.targets)
  unknown = sorted(set(targets) - set(LORA_TARGETS))
  if c.lora.enabled and (not targets or unknown):
    raise ValueError(f"config.lora.targets={targets} must name one or more of "
                     f"{list(LORA_TARGETS)}"
                     + (f"; unknown: {unknown}" if unknown else ""))


def _validate_contrastive(c: ml_collections.ConfigDict, batch_ways: int) -> None:
  """``config.contrastive`` checks (in-batch negatives need whole batches)."""
  k = c.contrastive
  tasks = {"contrastive": ("pairs", "cafe"), "cafe": ("cafe",)}
  if (c.objective in tasks or c.data.task in ("pairs", "cafe")) and (
      c.data.task not in tasks.get(c.objective, ())):
    raise ValueError(f"config.objective={c.objective!r} does not go with "
                     f"config.data.task={c.data.task!r}: contrastive reads "
                     "'pairs' or 'cafe' batches, cafe reads 'cafe' batches")
  if c.objective in ("contrastive", "cafe") and c.train.microbatches != 1:
    raise ValueError(
        f"config.train.microbatches={c.train.microbatches}: contrastive losses "
        "need the whole batch in one step; bound memory with "
        "config.contrastive.chunk_size (gradient caching) instead")
  if k.loss not in contrastive.LOSSES:
    raise ValueError(f"config.contrastive.loss={k.loss!r}: use one of "
                     f"{sorted(contrastive.LOSSES)}")
  if k.pooling not in ("last", "mean", "first"):
    raise ValueError(f"config.contrastive.pooling={k.pooling!r}: use last, "
                     "mean or first")
  if k.ring and (k.loss not in ("clip", "siglip") or k.matryoshka_dims):
    raise ValueError(f"config.contrastive.ring=True needs loss clip or siglip "
                     f"without matryoshka_dims, got loss={k.loss!r}, "
                     f"matryoshka_dims={k.matryoshka_dims}")
  if k.temperature < 0 or k.chunk_size < 0 or k.proj_dim < 0:
    raise ValueError(f"config.contrastive: temperature={k.temperature}, "
                     f"chunk_size={k.chunk_size} and proj_dim={k.proj_dim} "
                     "must be >= 0")
  texts = c.train.batch_size * c.data.get("num_views", 2)
  if k.chunk_size and (texts % k.chunk_size or k.chunk_size % batch_ways):
    raise ValueError(
        f"config.contrastive.chunk_size={k.chunk_size} must divide the "
        f"{texts} texts of a batch (batch_size x data.num_views) and be a "
        f"multiple of the {batch_ways} data x fsdp ways")


def field_docs() -> list[tuple[str, object, str]]:
  """``(field, default, comment)`` of every field, read from this source."""
  import inspect  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  defaults = base_config()
  out = []
  for line in inspect.getsource(base_config).splitlines():
    match = re.match(r"\s*c\.([\w.]+) = .*?(?:#\s*(.*))?$", line)
    if match and not isinstance(_get(defaults, match.group(1)),
                                ml_collections.ConfigDict):
      out.append((match.group(1), _get(defaults, match.group(1)),
                  match.group(2) or ""))
  return out


if __name__ == "__main__":
  # python -m alignax.defaults: every field, its default and what it means.
  for name, value, comment in field_docs():
    print(f"--config.{name}={value!r}  # {comment}")
