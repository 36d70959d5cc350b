"""Unsupervised topic discovery on news: a GMM over encoder embeddings, a document VAE, VaDE.

Variants are METHOD or METHOD_DATA: METHOD in gmm | vae | vade, DATA in ag_news (default),
thucnews, csv (your file, header row) or smoke (built-in toy topics, seconds on a CPU).
Labels are read only to score the clusters (NMI, ARI, cluster accuracy); set
--config.data.label_field=None for unlabelled data.

  # GMM on sentence embeddings of any MLM / classification run (or a Hugging Face BERT):
  python launch.py --config experiments/topics_news.py:gmm --workdir runs/topics_gmm \
      --config.init_from=runs/agnews
  # choose K by BIC over a range, full covariances on whitened embeddings:
  ... --config.topics.k_range=2-12 --config.topics.covariance=full --config.topics.normalize=whiten
  # the document VAE, and VaDE (its mixture prior fitted after topics.pretrain_steps):
  python launch.py --config experiments/topics_news.py:vae --workdir runs/topics_vae
  python launch.py --config experiments/topics_news.py:vade --workdir runs/topics_vade
  # Chinese headlines:
  python launch.py --config experiments/topics_news.py:vade_thucnews --workdir runs/topics_thuc
  # embeddings of a file (.npy + .ids.txt; cluster probabilities when the workdir has a model):
  python launch.py --config experiments/topics_news.py:gmm --workdir runs/topics_gmm \
      --config.init_from=runs/agnews --mode embed --config.predict.input=news.csv

Data: $ENCODER_JAX_SHARED_DATA (default ../shared/data beside the repository) for
ag_news / thucnews, or your files by override (data.files.train / data.files.validation).
"""

import os

import ml_collections
from ml_collections import config_dict

from encoder_jax.errors import ConfigError

METHODS = ("gmm", "vae", "vade")
DATASETS = ("ag_news", "thucnews", "csv", "smoke")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_data(*parts: str) -> str:
    root = os.environ.get("ENCODER_JAX_SHARED_DATA",
                          os.path.join(REPO_ROOT, os.pardir, "shared", "data"))
    return os.path.normpath(os.path.join(root, *parts))


def data_config(dataset: str) -> tuple[ml_collections.ConfigDict, int]:
    """The data section and the number of true topics of a dataset."""
    d = ml_collections.ConfigDict()
    d.name = config_dict.placeholder(str)
    d.train_split, d.eval_split = "train", "test"
    d.files = ml_collections.ConfigDict({"train": config_dict.placeholder(str),
                                         "validation": config_dict.placeholder(str)})
    d.format = "auto"
    d.has_header = False
    d.text_fields = "text"
    d.join_separator = " "
    d.label_field = config_dict.FieldReference("label", field_type=str)  # scoring only; None: unlabelled
    d.label_format = "auto"
    d.label_base = 0
    d.classes_file = config_dict.placeholder(str)
    d.allow_empty_text = False
    d.max_len = 128
    d.pad_lengths = (32, 64, 96, 128)
    d.length_group = 8
    d.batch_size = 64
    d.data_dir = config_dict.placeholder(str)
    d.workers = 0
    d.prefetch = 2
    k = 4
    if dataset == "ag_news":  # "class","title","description", class 1..4, no header
        d.files.train = shared_data("ag_news", "train.csv.gz")
        d.files.validation = shared_data("ag_news", "dev.csv.gz")
        d.text_fields, d.label_field, d.label_base = "1,2", "0", 1
        d.classes_file = shared_data("ag_news", "classes.txt")
    elif dataset == "thucnews":  # title<TAB>label
        d.files.train = shared_data("thucnews", "train.txt.gz")
        d.files.validation = shared_data("thucnews", "dev.txt.gz")
        d.format, d.text_fields, d.label_field = "tsv", "0", "1"
        d.classes_file = shared_data("thucnews", "class.txt")
        d.max_len, d.pad_lengths = 48, (16, 24, 32, 48)
        k = 10
    elif dataset == "csv":
        d.has_header = True
    else:  # smoke: built-in toy topics (title,body,topic)
        d.name, d.has_header, d.text_fields, d.label_field = "toy_topics", True, "title,body", "topic"
        d.max_len, d.pad_lengths, d.batch_size = 32, (16, 32), 16
    return d, k


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg == "smoke":  # the trainer smoke test's variant: the VAE on toy topics
        arg = "vae_smoke"
    method, _, dataset = (arg or "gmm").partition("_")
    dataset = dataset or "ag_news"
    if method not in METHODS or dataset not in DATASETS:
        raise ConfigError(f"topics_news variant {arg!r}; valid: METHOD or METHOD_DATA with METHOD in "
                          f"{list(METHODS)}, DATA in {list(DATASETS)}")
    smoke = dataset == "smoke"
    c = ml_collections.ConfigDict()
    c.task = "gmm_topics" if method == "gmm" else "vae_topics"
    c.seed = 0
    c.data, num_topics = data_config(dataset)

    c.topics = ml_collections.ConfigDict()
    c.topics.num_topics = num_topics  # K: GMM components / VaDE clusters
    c.topics.k_range = config_dict.placeholder(str)  # gmm: "2-12" picks K by BIC; None: num_topics
    c.topics.covariance = "diag"  # gmm: full | diag | spherical
    c.topics.n_init = 3
    c.topics.max_iter = 200
    c.topics.tol = 1e-4
    c.topics.reg_covar = 1e-5
    c.topics.pooling = "mean"  # gmm embeddings: cls | mean
    c.topics.normalize = "l2"  # gmm embeddings: none | l2 | whiten
    c.topics.max_fit_docs = 2000 if smoke else 20_000
    c.topics.latent_dim = 8 if smoke else 32  # VAE topics
    c.topics.hidden_dim = 32 if smoke else 256
    c.topics.prior = "mixture" if method == "vade" else "normal"
    c.topics.pretrain_steps = (1 if smoke else 1000) if method == "vade" else 0
    c.topics.kl_warmup_steps = 2 if smoke else 500
    c.topics.dropout_rate = 0.2
    c.topics.min_df = 2
    c.topics.max_df = 0.5
    c.topics.bigram_buckets = 0  # VAE: + hashed bigrams of adjacent tokens (THUCNews: of characters)
    c.topics.top_words = 10

    c.predict = ml_collections.ConfigDict()  # --mode embed
    c.predict.input = config_dict.placeholder(str)
    c.predict.output = config_dict.placeholder(str)  # None: <workdir>/embeddings.npy
    c.predict.text_fields = config_dict.placeholder(str)  # None: data.text_fields
    c.predict.has_header = config_dict.placeholder(bool)
    c.predict.batch_size = 64
    if method == "gmm":  # the encoder that embeds: an MLM / classification run, or a HF BERT
        c.init_from = config_dict.placeholder(str)
        c.init_from_hf = config_dict.placeholder(str)
        c.tokenizer = ml_collections.ConfigDict({"word_segmenter": "auto"})
        return c

    c.tokenizer = ml_collections.ConfigDict()  # the bag-of-words vocabulary
    c.tokenizer.model_file = config_dict.placeholder(str)
    c.tokenizer.model_type = "unigram"
    c.tokenizer.vocab_size = 400 if smoke else 8000
    c.tokenizer.character_coverage = 0.9995
    c.tokenizer.max_sentences = 300_000
    c.tokenizer.word_segmenter = "auto"
    if dataset == "thucnews":  # short headlines: characters and their bigrams as the words
        c.tokenizer.model_type = "char"
        c.topics.bigram_buckets = 32768

    c.opt = ml_collections.ConfigDict()
    c.opt.name = "adam"
    c.opt.learning_rate = 2e-3
    c.opt.schedule = "constant"
    c.opt.warmup_steps = 0
    c.opt.weight_decay = 0.0
    c.opt.grad_clip_norm = 5.0
    c.train = ml_collections.ConfigDict({"num_steps": 2 if smoke else 4000,
                                         "log_every": 1 if smoke else 100})
    c.ckpt = ml_collections.ConfigDict({"every_steps": 2 if smoke else 1000, "keep": 2,
                                        "use_async": not smoke})
    c.eval = ml_collections.ConfigDict({"every_steps": 2 if smoke else 1000,
                                        "batch_size": config_dict.placeholder(int),
                                        "best_metric": config_dict.placeholder(str)})
    c.mesh = ml_collections.ConfigDict({"fsdp": 1, "min_shard_size": 2 ** 14})
    return c
