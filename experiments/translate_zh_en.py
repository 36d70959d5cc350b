"""Chinese→English translation with a seq2seq Transformer (the project's encoder + a decoder).

Offline demo (generated Chinese numerals, dates and amounts with their English readings):
  python launch.py --config experiments/translate_zh_en.py:demo --workdir runs/demo
Tatoeba (english<TAB>chinese<TAB>attribution; zh→en takes column 1 as source, 0 as target):
  python launch.py --config experiments/translate_zh_en.py:tatoeba --workdir runs/zh_en \
      --config.data.files.train=PATH/train.tsv.gz --config.data.files.validation=PATH/dev.tsv.gz
  (or set $ENCODER_JAX_SHARED_DATA to a directory holding tatoeba_cmn_eng/{train,dev}.tsv.gz)
WMT19 zh-en from the TFDS catalog (downloads once):
  python launch.py --config experiments/translate_zh_en.py:wmt --workdir runs/wmt
Translate a file (one sentence per line) -> predictions.txt and predictions.jsonl (scores, n-best):
  python launch.py --config experiments/translate_zh_en.py:tatoeba --workdir runs/zh_en \
      --mode predict --config.predict.input=sentences.zh.txt --config.predict.nbest=4
Encoder from an MLM run on Chinese text (its tokenizer is the source side; a target one is trained):
  python launch.py --config experiments/translate_zh_en.py:tatoeba --workdir runs/zh_en_mlm \
      --config.init_from=runs/mlm_zh
Variants: demo, smoke (seconds, tests), tatoeba, wmt.
"""

import os

import ml_collections
from ml_collections import config_dict

from encoder_jax.errors import ConfigError

VARIANTS = ("demo", "smoke", "tatoeba", "wmt")
# (encoder layers, decoder layers, hidden, heads, feed-forward)
SHAPES = {"smoke": (1, 1, 32, 2, 64), "demo": (2, 2, 128, 4, 512), "tatoeba": (3, 3, 256, 4, 1024),
          "wmt": (6, 6, 512, 8, 2048)}


def shared_file(*parts: str) -> str | None:
    """A file under $ENCODER_JAX_SHARED_DATA, or None when the variable is not set."""
    root = os.environ.get("ENCODER_JAX_SHARED_DATA")
    return os.path.join(root, *parts) if root else None


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "demo"
    if variant not in VARIANTS:
        raise ConfigError(f"translate_zh_en variant {variant!r}; valid: {list(VARIANTS)}")
    small = variant in ("smoke", "demo")
    c = ml_collections.ConfigDict()
    c.task = "translate"
    c.seed = 0  # seeds init, data order and dropout
    c.init_from = config_dict.placeholder(str)  # another run's workdir: its encoder and tokenizer
    c.init_from_hf = config_dict.placeholder(str)  # a Hugging Face BERT directory, likewise

    enc_layers, dec_layers, hidden, heads, mlp = SHAPES[variant]
    c.model = ml_collections.ConfigDict()
    c.model.num_layers = enc_layers  # encoder blocks
    c.model.decoder_layers = dec_layers
    c.model.hidden_dim = hidden
    c.model.num_heads = heads
    c.model.mlp_dim = mlp
    c.model.max_len = 128 if small else 256  # source position table (>= data.max_len)
    c.model.max_target_len = 128 if small else 256  # target position table (>= data.max_len)
    c.model.type_vocab_size = 0  # no sentence A/B embeddings (an init_from encoder brings its own)
    c.model.share_embeddings = True  # one table for source, target and output (needs tokenizer.joint)
    c.model.tie_output = True
    c.model.pre_norm = True  # pre-LN (stable for seq2seq); False: post-LN as BERT
    # demo: none. Its generated pairs are learned by a phase change whose step moved with the
    # seed under dropout 0.1 (dev BLEU at step 2000: 49.1 with seed 0, 98.9 with seed 1);
    # without dropout 97.8 and 99.1 (seeds 0, 1), 65 and 89 already at step 1000.
    c.model.dropout_rate = 0.0 if variant == "demo" else 0.1
    c.model.attention_dropout_rate = 0.0 if small else 0.1
    c.model.activation = "gelu"
    c.model.layer_norm_eps = 1e-6
    c.model.init_std = 0.02
    # wmt: recompute the feed-forward activation in the backward pass (layers.REMAT_MODES):
    # ~150 MiB less of XLA's temporaries at batch 16 x 64 tokens on a CPU, elementwise work only.
    c.model.remat = "mlp" if variant == "wmt" else "none"
    # wmt: dropout masks from a hash of each position (encoder_jax/dropout.py): fused into the
    # step, nothing stored; less memory and time than threefry's masks.
    c.model.dropout_rng = "hash" if variant == "wmt" else "threefry"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.name = "zh_en_numbers" if small else None  # built-in demo, or a TFDS catalog name
    c.data.files = ml_collections.ConfigDict()
    c.data.files.train = config_dict.placeholder(str)  # tsv/csv(.gz) paths/globs; override name
    c.data.files.validation = config_dict.placeholder(str)
    c.data.format = "auto"
    c.data.has_header = False
    c.data.source_column = "1"  # Tatoeba layout english<TAB>chinese<TAB>attribution: zh->en
    c.data.target_column = "0"
    c.data.source_field = "zh"  # TFDS catalog record fields
    c.data.target_field = "en"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.data_dir = config_dict.placeholder(str)
    c.data.max_len = 32 if small else 64  # tokens per side incl. BOS/EOS; longer training pairs dropped
    c.data.pad_lengths = (16, 32) if small else (16, 24, 32, 48, 64)
    c.data.max_tokens = {"smoke": 256, "demo": 2048}.get(variant, 4096)  # tokens per global batch
    c.data.batch_multiple = 8  # rows per batch are a multiple of this (devices)
    c.data.window = 4096  # examples per length-sorting window
    c.data.max_train_examples = config_dict.placeholder(int)  # the first N pairs; None: all
    if variant == "smoke":
        c.data.max_train_examples = 2000
    c.data.max_eval_examples = 64 if variant == "smoke" else config_dict.placeholder(int)
    c.data.workers = 0
    c.data.prefetch = 2

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.joint = True  # one sentencepiece model for both sides
    c.tokenizer.model_file = config_dict.placeholder(str)
    c.tokenizer.vocab_file = config_dict.placeholder(str)
    c.tokenizer.target_model_file = config_dict.placeholder(str)
    c.tokenizer.model_type = "unigram"
    c.tokenizer.vocab_size = {"smoke": 300, "demo": 600, "tatoeba": 8000}.get(variant, 32000)
    c.tokenizer.target_vocab_size = config_dict.placeholder(int)  # separate target model; None: vocab_size
    c.tokenizer.character_coverage = 0.9995  # Chinese needs < 1.0
    c.tokenizer.max_sentences = 300_000
    c.tokenizer.word_segmenter = "auto"

    c.translate = ml_collections.ConfigDict()
    c.translate.label_smoothing = 0.1
    c.translate.beam_size = 4  # --mode predict
    c.translate.eval_beam_size = 1 if small else 4  # in-loop evaluation (1: greedy)
    c.translate.length_penalty = 0.6  # GNMT alpha
    c.translate.max_len_a = 10  # generated tokens <= a + b * source tokens
    c.translate.max_len_b = 1.5
    c.translate.samples = 10
    c.translate.eval_batch_size = 64
    # Decode-cache blocks, one search loop each: a step reads only the filled blocks (beam 4
    # at the Marian shape: ~10% faster with 8), but each block compiles its own loop.
    c.translate.cache_blocks = 1 if small else 8

    c.opt = ml_collections.ConfigDict()
    c.opt.name = "adamw"
    c.opt.learning_rate = 2e-3 if small else 1e-3
    c.opt.schedule = "rsqrt"  # inverse square root after warmup (Transformer)
    c.opt.warmup_steps = {"smoke": 1, "demo": 200}.get(variant, 1000)
    c.opt.end_lr_fraction = 0.0
    c.opt.weight_decay = 0.01
    c.opt.b1 = 0.9
    c.opt.b2 = 0.98
    c.opt.eps = 1e-9
    c.opt.momentum = 0.9
    c.opt.rms_decay = 0.9
    c.opt.grad_clip_norm = 1.0
    c.opt.grad_accum_steps = 1

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = {"smoke": 2, "demo": 2000, "tatoeba": 8000}.get(variant, 200_000)
    c.train.log_every = {"smoke": 1}.get(variant, 50)
    c.train.max_steps_per_run = config_dict.placeholder(int)
    c.train.peak_flops_per_device = config_dict.placeholder(float)
    # Minutes of training: the LR schedule runs on elapsed time (warm-up = opt.warmup_steps /
    # train.num_steps of it); stops with a checkpoint and a full eval when spent. None: by steps.
    c.train.time_budget = config_dict.placeholder(float)
    c.train.cpu_scheduler = "memory"  # XLA:CPU: memory (least peak memory) | concurrency (XLA's default)

    c.ckpt = ml_collections.ConfigDict()
    c.ckpt.every_steps = {"smoke": 2, "demo": 500}.get(variant, 1000)
    c.ckpt.keep = 3
    c.ckpt.average_last = 0  # at the end, average the last N checkpoints' params (<= keep); 0: off
    c.ckpt.use_async = variant != "smoke"

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = {"smoke": 2, "demo": 500}.get(variant, 1000)
    c.eval.batch_size = config_dict.placeholder(int)  # unused: translate.eval_batch_size
    c.eval.best_metric = "bleu"  # keep <workdir>/best by dev BLEU
    c.eval.best_mode = "max"
    c.eval.early_stop_patience = 0

    c.predict = ml_collections.ConfigDict()
    c.predict.input = config_dict.placeholder(str)  # one source sentence per line (.gz ok)
    c.predict.output = config_dict.placeholder(str)  # text; jsonl beside it; None: <workdir>/predictions.txt
    c.predict.batch_size = 64
    c.predict.nbest = 1

    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1
    c.mesh.min_shard_size = 2 ** 14

    if variant == "tatoeba":  # sized for about 50 minutes on 2 CPU cores
        c.data.files.train = shared_file("tatoeba_cmn_eng", "train.tsv.gz")
        c.data.files.validation = shared_file("tatoeba_cmn_eng", "dev.tsv.gz")
        c.data.format = "tsv"
        c.model.attention_dropout_rate = 0.0  # keeps the fused attention path (faster on CPU)
        c.opt.warmup_steps = 400
        c.train.num_steps = 4000
        c.eval.every_steps = 500
        c.ckpt.every_steps = 500
        c.translate.eval_beam_size = 1  # greedy in the loop; --mode predict uses beam 4
    elif variant == "wmt":
        c.data.name = "wmt19_translate/zh-en"
        c.data.max_len = 128
        c.data.pad_lengths = (32, 64, 96, 128)
        c.data.max_tokens = 8192
        c.tokenizer.max_sentences = 2_000_000
    return c
