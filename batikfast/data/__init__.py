"""Training data: image folders and zip archives, and the built-in procedural batik motifs."""
from batikfast.data.batik import MOTIFS, BuiltinBatikDataset, render_batik
from batikfast.data.dataset import Dataset, DatasetError, ImageFolderDataset
from batikfast.data.loader import InfiniteSampler, make_loader, open_dataset

__all__ = ["Dataset", "DatasetError", "ImageFolderDataset", "BuiltinBatikDataset", "MOTIFS",
           "render_batik", "InfiniteSampler", "make_loader", "open_dataset"]
