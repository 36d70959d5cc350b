"""News classification fine-tuning: AG News (4 classes), THUCNews headlines (10), any csv/tsv.

Data: the staged files under $ENCODER_JAX_SHARED_DATA (default: ../shared/data
next to the repository), or your own files / a TFDS catalog dataset by override.

Train (from scratch, from an MLM run's encoder with init_from, or from a Hugging Face
BERT directory with init_from_hf: config.json, model.safetensors or pytorch_model.bin, vocab.txt):
  python launch.py --config experiments/classify_news.py:ag_news --workdir runs/agnews
  python launch.py --config experiments/classify_news.py:ag_news --workdir runs/agnews_mlm \
      --config.init_from=runs/mlm
  python launch.py --config experiments/classify_news.py:ag_news --workdir runs/agnews_bert \
      --config.init_from_hf=path/to/bert-dir
  python launch.py --config experiments/classify_news.py:smoke --workdir runs/smoke_bert \
      --config.init_from_hf=path/to/bert-dir
  python launch.py --config experiments/classify_news.py:thucnews --workdir runs/thuc
Partial fine-tuning (head only, top 2 blocks + head, or a regex over parameter paths):
  ... --config.finetune.trainable=head | top:2 | 're:(classifier|block_1)'
Your own csv (header row; text fields joined, or --config.data.text_mode=pair):
  python launch.py --config experiments/classify_news.py:csv --workdir runs/mine \
      --config.data.files.train=my.csv --config.data.files.validation=my_dev.csv \
      --config.data.text_fields=title,body --config.data.label_field=topic
AG News from the TFDS catalog (needs internet once):
  python launch.py --config experiments/classify_news.py:ag_news_tfds --workdir runs/agnews_tfds
Predict (csv/tsv/jsonl in, jsonl out; best checkpoint if kept):
  python launch.py --config experiments/classify_news.py:ag_news --workdir runs/agnews \
      --mode predict --config.predict.input=new.csv --config.predict.output=preds.jsonl
The linear baseline on the same rows (TF-IDF n-grams + linear SVM; seconds; <workdir>/baseline/):
  python launch.py --config experiments/classify_news.py:ag_news --workdir runs/agnews --mode baseline
Grid search / k-fold cross-validation (tables in the workdir; one run by index for clusters):
  python launch.py --config experiments/classify_news.py:ag_news --workdir runs/sweep --mode sweep \
      --config.sweep.grid='{"opt.learning_rate":[1e-4,3e-4],"finetune.trainable":["all","top:2"]}'
Label-efficiency curve (scratch vs pretrained, the baseline on the same rows; curve.png):
  python launch.py --config experiments/classify_news.py:ag_news --workdir runs/curve --mode sweep \
      --config.sweep.grid='{"data.max_train_examples":[500,2000,8000,null],"init_from":[null,"runs/mlm"]}' \
      --config.sweep.baseline=True --config.sweep.curve=data.max_train_examples
  python launch.py --config experiments/classify_news.py:ag_news --workdir runs/cv --mode cv \
      --config.cv.folds=5 --config.data.max_train_examples=5000
Variants: ag_news, ag_news_tfds, thucnews, csv, smoke (built-in toy topics, seconds on a CPU):
  python launch.py --config experiments/classify_news.py:smoke --workdir runs/smoke
"""

import os

import ml_collections
from ml_collections import config_dict

from encoder_jax.errors import ConfigError

VARIANTS = ("ag_news", "ag_news_tfds", "thucnews", "csv", "smoke")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_data(*parts: str) -> str:
    """A path under $ENCODER_JAX_SHARED_DATA (default ../shared/data beside the repository)."""
    root = os.environ.get("ENCODER_JAX_SHARED_DATA",
                          os.path.join(REPO_ROOT, os.pardir, "shared", "data"))
    return os.path.normpath(os.path.join(root, *parts))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "ag_news"
    if variant not in VARIANTS:
        raise ConfigError(f"classify_news variant {variant!r}; valid: {list(VARIANTS)}")
    smoke = variant == "smoke"
    c = ml_collections.ConfigDict()
    c.task = "classify"
    c.seed = 0  # seeds init, data order, dropout and augmentation
    c.init_from = config_dict.placeholder(str)  # an MLM run's workdir: encoder, tokenizer, shape; None: fresh
    c.init_from_hf = config_dict.placeholder(str)  # a Hugging Face BERT directory, likewise; None: fresh
    # Precedence: resume from --workdir > init_from or init_from_hf (not both) > fresh.

    c.model = ml_collections.ConfigDict()
    # Architecture: None = the init_from / init_from_hf encoder's value (or, on resume, the
    # workdir's model.json), else model.scratch / the encoder default. An explicit value must agree.
    for field, kind in (("num_layers", int), ("hidden_dim", int), ("num_heads", int),
                        ("mlp_dim", int), ("max_len", int), ("type_vocab_size", int),
                        ("activation", str), ("layer_norm_eps", float), ("pre_norm", bool),
                        ("use_pooler", bool), ("bigram_buckets", int)):
        setattr(c.model, field, config_dict.placeholder(kind))
    c.model.scratch = ml_collections.ConfigDict(  # shape when training from scratch
        {"num_layers": 1, "hidden_dim": 32, "num_heads": 2, "mlp_dim": 64, "max_len": 64} if smoke
        else {"num_layers": 2, "hidden_dim": 128, "num_heads": 2, "mlp_dim": 512, "max_len": 512})
    c.model.pooling = "first"  # first: tanh pooler on [CLS] | mean: mean of real tokens
    c.model.wide_buckets = 0  # >0: add a linear model over tokens + this many hashed bigram rows (Wide & Deep)
    c.model.wide_chars = False  # the wide part also sees character uni/bigrams (Chinese: see docs/recipes.md)
    c.model.dropout_rate = 0.1  # also the classifier-head dropout
    c.model.attention_dropout_rate = 0.1
    c.model.init_std = 0.02
    c.model.remat = "none"  # none | block | mlp (layers.REMAT_MODES)
    c.model.dropout_rng = "threefry"  # threefry | hash (encoder_jax/dropout.py)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16
    c.model.param_dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.name = config_dict.placeholder(str)  # without files: built-in toy_topics or a TFDS name (ag_news_subset)
    c.data.train_split = "train"  # TFDS split names
    c.data.eval_split = "test"
    c.data.files = ml_collections.ConfigDict()
    c.data.files.train = config_dict.placeholder(str)  # comma-separated paths/globs (csv/tsv, .gz ok)
    c.data.files.validation = config_dict.placeholder(str)
    c.data.format = "auto"  # auto (by extension) | csv | tsv
    c.data.has_header = False  # csv/tsv: first row names the columns
    c.data.text_fields = "text"  # comma-separated header names or 0-based indices
    c.data.text_mode = "join"  # join: one text | pair: first field is A, the rest B (type ids 0/1)
    c.data.join_separator = " "
    c.data.label_field = "label"  # header name or 0-based index
    c.data.label_format = "auto"  # auto | index (integers) | name (strings)
    c.data.label_base = 0  # integer labels start here (AG News: 1)
    c.data.classes_file = config_dict.placeholder(str)  # class names, one a line; None: from the data
    c.data.num_classes = config_dict.placeholder(int)  # integer labels without names; None: max + 1
    c.data.allow_empty_text = False  # False: an empty text field is an error
    c.data.max_train_examples = config_dict.placeholder(int)  # a fixed random subset; None: all
    c.data.subset_seed = 0
    c.data.max_len = 64 if smoke else 128  # tokens per row incl. [CLS]/[SEP]; longer texts truncated
    c.data.pad_lengths = (16, 32, 64) if smoke else (32, 48, 64, 96, 128)  # rows padded to one of these
    c.data.length_group = 8  # batches per length-sorted window (1: no grouping)
    c.data.batch_size = 8 if smoke else 32  # global rows per optimizer step
    c.data.data_dir = config_dict.placeholder(str)  # prepared-data cache; None: $ENCODER_JAX_DATA_DIR or ~/.cache
    c.data.workers = 0  # grain worker processes (0: in the main process)
    c.data.prefetch = 2

    c.tokenizer = ml_collections.ConfigDict()  # trained on the training texts unless init_from(_hf)
    c.tokenizer.model_file = config_dict.placeholder(str)  # a sentencepiece .model; None: train one
    c.tokenizer.model_type = "unigram"
    c.tokenizer.vocab_size = 400 if smoke else 8000
    c.tokenizer.character_coverage = 0.9995
    c.tokenizer.max_sentences = 300_000
    c.tokenizer.word_segmenter = "auto"

    c.finetune = ml_collections.ConfigDict()
    c.finetune.trainable = "all"  # all | head | top:K (top K blocks + head) | re:<regex over paths>
    c.finetune.layer_lr_decay = config_dict.placeholder(float)  # e.g. 0.8: LR x 0.8 per block down; None: off
    c.finetune.label_smoothing = 0.0
    c.finetune.augment_delete = 0.0  # probability of deleting each token (training only)
    c.finetune.augment_mask = 0.0  # probability of replacing each token by [MASK]
    c.finetune.reinit_top_layers = 0  # init_from(_hf): fresh top K blocks + pooler (small data)
    c.finetune.wide_lr_scale = 100.0  # LR factor of the wide n-gram tables (model.wide_buckets > 0)
    c.finetune.wide_loss = "joint"  # joint: one loss on deep + wide logits | separate: one loss per part

    c.opt = ml_collections.ConfigDict()
    c.opt.name = "adamw"  # sgd | momentum | nesterov | adam | adamw | rmsprop | adagrad | adafactor | lamb | lion
    c.opt.learning_rate = 1e-3 if smoke else 5e-4
    c.opt.schedule = "linear"  # decay after warmup: constant | linear | cosine | rsqrt
    c.opt.warmup_steps = 1 if smoke else 200
    c.opt.end_lr_fraction = 0.0
    c.opt.weight_decay = 0.01  # decoupled (adamw/lamb/lion); never on biases or LayerNorm
    c.opt.b1 = 0.9
    c.opt.b2 = 0.999
    c.opt.eps = 1e-6
    c.opt.momentum = 0.9  # momentum / nesterov / rmsprop
    c.opt.rms_decay = 0.9
    c.opt.grad_clip_norm = 1.0  # 0: no clipping
    c.opt.grad_accum_steps = 1

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 2 if smoke else 3000
    c.train.log_every = 1 if smoke else 50
    c.train.peak_flops_per_device = config_dict.placeholder(float)  # for MFU; None: measured
    # Minutes of training: the LR schedule runs on elapsed time (warm-up = opt.warmup_steps /
    # train.num_steps of it); stops with a checkpoint and a full eval when spent. None: by steps.
    c.train.time_budget = config_dict.placeholder(float)
    c.train.cpu_scheduler = "memory"  # XLA:CPU: memory (least peak memory) | concurrency (XLA's default)

    c.ckpt = ml_collections.ConfigDict()
    c.ckpt.every_steps = 2 if smoke else 500
    c.ckpt.keep = 2
    c.ckpt.average_last = 0  # at the end, average the last N checkpoints' params (<= keep); 0: off
    c.ckpt.use_async = not smoke

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 2 if smoke else 500
    c.eval.batch_size = config_dict.placeholder(int)  # None: data.batch_size
    c.eval.best_metric = "accuracy"  # keep <workdir>/best by this eval metric; None: off
    c.eval.best_mode = "auto"  # auto (min for *loss*, else max) | max | min
    c.eval.early_stop_patience = 0  # evaluations without improvement before stopping; 0: never

    c.sweep = ml_collections.ConfigDict()
    c.sweep.grid = "{}"  # JSON {"dotted.field": [values, ...]}; the product is searched
    c.sweep.index = config_dict.placeholder(int)  # run only this run index (clusters); None: all
    c.sweep.repeats = 1  # seeds per point (sweep mode); mean +- std over them
    c.sweep.metric = config_dict.placeholder(str)  # ranks settings; None: eval.best_metric
    c.sweep.baseline = False  # also fit the TF-IDF + linear baseline on each run's rows
    c.sweep.curve = config_dict.placeholder(str)  # a grid field: curve.png of the metric against it

    c.baseline = ml_collections.ConfigDict()  # --mode baseline: the model to beat, same rows
    c.baseline.features = "auto"  # auto (char 1-3-grams for CJK text, else word 1-2-grams) | word | char
    c.baseline.model = "svm"  # svm (linear SVM) | logreg
    c.baseline.C = 1.0
    c.baseline.max_features = config_dict.placeholder(int)  # None: every n-gram seen

    c.cv = ml_collections.ConfigDict()
    c.cv.folds = 5  # --mode cv: stratified folds of the training split
    c.cv.fold = config_dict.placeholder(int)  # set per run by --mode cv; None: use data.files.validation
    c.cv.seed = 0

    c.predict = ml_collections.ConfigDict()
    c.predict.input = config_dict.placeholder(str)  # csv / tsv / jsonl (.gz ok)
    c.predict.output = config_dict.placeholder(str)  # jsonl; None: <workdir>/predictions.jsonl
    c.predict.text_fields = config_dict.placeholder(str)  # None: data.text_fields
    c.predict.has_header = config_dict.placeholder(bool)  # None: data.has_header
    c.predict.batch_size = 64
    c.predict.artifact = config_dict.placeholder(str)  # an export dir (--mode export) to predict with; None: the workdir

    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1
    c.mesh.min_shard_size = 2 ** 14

    if variant == "ag_news":  # "class","title","description", class 1..4, no header
        c.data.files.train = shared_data("ag_news", "train.csv.gz")
        c.data.files.validation = shared_data("ag_news", "dev.csv.gz")
        c.data.text_fields = "1,2"
        c.data.label_field = "0"
        c.data.label_base = 1
        c.data.classes_file = shared_data("ag_news", "classes.txt")
    elif variant == "ag_news_tfds":
        c.data.name = "ag_news_subset"
        c.data.text_fields = "title,description"
        c.data.label_field = "label"
    elif variant == "thucnews":  # title<TAB>label, label 0..9, names in class.txt
        c.data.files.train = shared_data("thucnews", "train.txt.gz")
        c.data.files.validation = shared_data("thucnews", "dev.txt.gz")
        c.data.format = "tsv"
        c.data.text_fields = "0"
        c.data.label_field = "1"
        c.data.classes_file = shared_data("thucnews", "class.txt")
        c.data.max_len = 48
        c.data.pad_lengths = (16, 24, 32, 48)
        c.tokenizer.character_coverage = 0.9995
    elif variant == "csv":  # your file: header row, columns named by the overrides
        c.data.has_header = True
        c.data.text_fields = "text"
        c.data.label_field = "label"
    elif variant == "smoke":  # built-in offline toy topics (title,body,topic), or your files
        c.data.name = "toy_topics"
        c.data.has_header = True
        c.data.text_fields = "title,body"
        c.data.label_field = "topic"
    return c
