"""BERT masked-language-model pretraining.

Run (offline CPU demo on the built-in corpus, a few minutes on 2 cores):
  python launch.py --config experiments/bert_mlm.py --workdir runs/mlm
Variants after the colon: smoke (tests), small, base (BERT-base), large (BERT-large):
  python launch.py --config experiments/bert_mlm.py:base --workdir runs/base \
      --config.data.name=wiki40b/en
Continue pretraining a Hugging Face BERT (its config.json, weights and vocab.txt), or another
run (--config.init_from=runs/mlm):
  python launch.py --config experiments/bert_mlm.py:small --workdir runs/bert_continued \
      --config.init_from_hf=path/to/bert-dir
Your own corpus (txt one document per line / blank-line blocks / WikiExtractor, csv, tsv; .gz ok):
  python launch.py --config experiments/bert_mlm.py:small --workdir runs/wiki \
      --config.data.files.train='wiki/train.*.txt.gz' --config.data.files.validation=wiki/valid.txt.gz
"""

import ml_collections
from ml_collections import config_dict

from encoder_jax.errors import ConfigError

VARIANTS = ("default", "smoke", "small", "base", "large")

# (num_layers, hidden_dim, num_heads, mlp_dim)
SHAPES = {"smoke": (1, 32, 2, 64), "default": (2, 128, 2, 512), "small": (4, 256, 4, 1024),
          "base": (12, 768, 12, 3072), "large": (24, 1024, 16, 4096)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ConfigError(f"bert_mlm variant {variant!r}; valid: {list(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.task = "mlm"
    c.seed = 0  # seeds init, data order, masks and dropout
    # A Hugging Face BERT directory (config.json, weights, vocab.txt) to continue pretraining:
    # it sets the model shape and the WordPiece tokenizer (model.* keeps only dropout, dtypes,
    # remat); its weights replace the fresh ones. A checkpoint in --workdir (resume) wins.
    c.init_from_hf = config_dict.placeholder(str)
    # Another run's workdir (an MLM run, an imported checkpoint), likewise: its shape, tokenizer
    # and weights (encoder and MLM head). Not both; a checkpoint in --workdir wins.
    c.init_from = config_dict.placeholder(str)

    c.model = ml_collections.ConfigDict()
    layers, hidden, heads, mlp = SHAPES[variant]
    c.model.num_layers = layers
    c.model.hidden_dim = hidden
    c.model.num_heads = heads
    c.model.mlp_dim = mlp
    c.model.max_len = 512  # position-table size (>= data.seq_len)
    c.model.type_vocab_size = 2
    c.model.dropout_rate = 0.1
    c.model.attention_dropout_rate = 0.1
    c.model.activation = "gelu"  # gelu (exact, as BERT) | gelu_tanh | relu | silu
    c.model.layer_norm_eps = 1e-12
    c.model.pre_norm = False  # False: post-LN (BERT); True: pre-LN
    c.model.use_pooler = True
    c.model.bigram_buckets = 0  # > 0: hashed (previous, current) token-pair embeddings, fastText style
    c.model.init_std = 0.02
    c.model.remat = "none"  # none | block (recompute blocks: less memory, ~1/3 more FLOPs) | mlp
    c.model.dropout_rng = "threefry"  # threefry | hash (faster, no stored masks; encoder_jax/dropout.py)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16
    c.model.param_dtype = "float32"  # storage dtype

    c.data = ml_collections.ConfigDict()
    c.data.name = "python_docs"  # built-in offline corpus, or a TFDS catalog name (e.g. wiki40b/en)
    c.data.files = ml_collections.ConfigDict()
    c.data.files.train = config_dict.placeholder(str)  # comma-separated paths/globs; overrides name
    c.data.files.validation = config_dict.placeholder(str)
    c.data.format = "auto"  # auto (per file, so a csv and Wikipedia text can mix) | lines | paragraphs | wikiextractor | csv | tsv
    c.data.text_column = "0"  # csv/tsv: header name or 0-based index; "1,2": those cells joined
    c.data.has_header = False
    c.data.text_field = "text"  # field of TFDS catalog records
    c.data.train_split = "train"  # TFDS catalog split names
    c.data.eval_split = "validation"
    c.data.data_dir = config_dict.placeholder(str)  # prepared-data cache; None: $ENCODER_JAX_DATA_DIR or ~/.cache/encoder_jax/tfds
    c.data.seq_len = 128  # tokens per packed row
    c.data.batch_size = 32  # global rows per optimizer step
    c.data.workers = 0  # grain worker processes (0: tokenize in the main process)
    c.data.prefetch = 2  # batches buffered per worker

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.model_file = config_dict.placeholder(str)  # a sentencepiece .model; None: train one
    c.tokenizer.vocab_file = config_dict.placeholder(str)  # a BERT WordPiece vocab.txt (options from tokenizer_config.json beside it); wins over model_file
    c.tokenizer.model_type = "unigram"  # unigram | bpe
    c.tokenizer.vocab_size = {"smoke": 512, "default": 8000}.get(variant, 32000)
    c.tokenizer.character_coverage = 0.9995  # 0.9995 for CJK, 1.0 for small alphabets
    c.tokenizer.max_sentences = 300_000  # lines sampled to train the tokenizer
    c.tokenizer.word_segmenter = "auto"  # whole words: auto | whitespace | jieba (Chinese)

    c.mlm = ml_collections.ConfigDict()
    c.mlm.rate = 0.15  # fraction of eligible tokens predicted
    c.mlm.max_predictions = config_dict.placeholder(int)  # slots per row; None: ceil(rate*seq_len)+1
    c.mlm.whole_word = False  # mask all sub-tokens of a word together
    c.mlm.mask_fraction = 0.8  # chosen tokens replaced by [MASK]
    c.mlm.random_fraction = 0.1  # ... by a random token (the rest stay unchanged)
    c.mlm.objective = "mlm"  # mlm | electra (replaced-token detection; the generator shares embeddings)
    c.mlm.generator_layers = 1  # electra: generator blocks (discriminator width)
    c.mlm.rtd_weight = 50.0  # electra: detection-loss weight (the paper's lambda)
    # Token table at step 0: random (BERT) | ppmi: vectors from the corpus' windowed
    # co-occurrence (PPMI + SVD, seconds of CPU; docs/recipes.md); a checkpoint or init_from wins.
    c.mlm.embedding_init = "random"
    c.mlm.ppmi_window = 10  # tokens either side that co-occur
    c.mlm.ppmi_docs = 200_000  # training documents counted, evenly spaced over the corpus
    c.mlm.ppmi_std = 1.0  # standard deviation the table is scaled to

    c.opt = ml_collections.ConfigDict()
    c.opt.name = "adamw"  # sgd | momentum | nesterov | adam | adamw | rmsprop | adagrad | adafactor | lamb | lion
    c.opt.learning_rate = {"smoke": 1e-3, "default": 1e-3, "small": 5e-4}.get(variant, 1e-4)
    c.opt.schedule = "linear"  # decay after warmup: constant | linear | cosine | rsqrt
    c.opt.warmup_steps = {"smoke": 1, "default": 100, "small": 500}.get(variant, 10_000)
    c.opt.end_lr_fraction = 0.0  # final learning rate as a fraction of the peak
    c.opt.weight_decay = 0.01  # decoupled (adamw/lamb/lion); never on biases or LayerNorm
    c.opt.b1 = 0.9
    c.opt.b2 = 0.999
    c.opt.eps = 1e-6
    c.opt.momentum = 0.9  # momentum / nesterov / rmsprop
    c.opt.rms_decay = 0.9
    c.opt.grad_clip_norm = 1.0  # 0: no clipping
    c.opt.grad_accum_steps = 1  # micro-batches per step (data.batch_size must divide by it)

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = {"smoke": 2, "default": 1500, "small": 20_000}.get(variant, 1_000_000)
    c.train.log_every = {"smoke": 1, "default": 50}.get(variant, 100)
    c.train.max_steps_per_run = config_dict.placeholder(int)  # checkpoint and exit after this many steps (time-sliced jobs); None: run to num_steps
    c.train.peak_flops_per_device = config_dict.placeholder(float)  # for MFU; None: measured matmul peak
    # Minutes of training: the LR schedule runs on elapsed time (warm-up = opt.warmup_steps /
    # train.num_steps of it); stops with a checkpoint and a full eval when spent. None: by steps.
    c.train.time_budget = config_dict.placeholder(float)
    c.train.cpu_scheduler = "memory"  # XLA:CPU: memory (least peak memory) | concurrency (XLA's default)

    c.ckpt = ml_collections.ConfigDict()
    c.ckpt.every_steps = {"smoke": 1, "default": 500}.get(variant, 1000)
    c.ckpt.keep = 3
    c.ckpt.use_async = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = {"smoke": 2, "default": 500}.get(variant, 2000)
    c.eval.batch_size = config_dict.placeholder(int)  # None: data.batch_size
    c.eval.max_batches = config_dict.placeholder(int)  # None: the whole held-out split

    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1  # devices on the parameter-sharding axis (-1: all); the rest are data-parallel
    c.mesh.min_shard_size = 2 ** 14  # arrays smaller than this stay replicated

    if variant == "smoke":
        c.data.seq_len = 32
        c.data.batch_size = 8
        c.model.max_len = 64
        c.tokenizer.max_sentences = 5000
        c.eval.max_batches = 2
    if variant in ("base", "large"):
        c.data.seq_len = 128  # BERT phase 1; phase 2: --config.data.seq_len=512
        c.data.batch_size = 256
        c.data.workers = 8
    return c
