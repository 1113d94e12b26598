"""Data: corpus preprocessing to packed shards, the shard reader, tokenizers, image datasets and
collators that batch tokenised examples for pre-training objectives."""
from .collator import MLMCollator
from .images import ImageFolder, fashion_mnist, open_image_dataset, preprocess_images
from .preprocess import preprocess_text
from .shards import CorruptShardError, ShardDataset, read_manifest, write_shards
from .shards import collate as collate_shards
from .tokenizer import load_tokenizer, special_token_ids, train_tokenizer

__all__ = ["MLMCollator", "ShardDataset", "collate_shards", "write_shards", "read_manifest", "CorruptShardError",
           "preprocess_text", "load_tokenizer", "train_tokenizer", "special_token_ids", "fashion_mnist",
           "ImageFolder", "open_image_dataset", "preprocess_images"]
