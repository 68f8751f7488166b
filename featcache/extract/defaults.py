"""Every extraction option's default, in one place: ``featcache extract`` (cli.py), the Python
API (api.extract_features) and the run's own config (config.ExtractConfig) all read these.
No imports: the command line's --help stays instant."""

BASE = "vgg16"
WEIGHTS = "imagenet"
POOLING = "none"
BATCH_SIZE = 32
DTYPE = "float32"
PRECISION = "auto"  # resolved per device and base before keying
DECODE = "auto"  # resolved per machine (config.resolve_decode)
DECODERS = ("auto", "threads", "processes", "gpu", "hybrid")  # --decode choices
RESIZE = "auto"  # resolved per machine and decoder before keying
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, validation, test, for folders without split folders
SPLIT = ",".join(str(f) for f in SPLIT_FRACTIONS)  # the command line's spelling
SPLIT_SEED = 0
SEED = 0  # of random init (weights none)
MAX_PIXELS = 100_000_000  # images with more pixels are refused before decoding
AUGMENT = 0  # augmented views per training image
AUG_SEED = 0
