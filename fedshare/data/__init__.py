"""Datasets, splits and sharing plans."""

from fedshare.data.dataset import Dataset, load_dataset
from fedshare.data.interactions import Interactions
from fedshare.data.prepared import PreparedData, prepare
from fedshare.data.sharing import SharingConfig, SharingPlan, make_plan
from fedshare.data.split import Split, random_split

__all__ = ["Dataset", "Interactions", "PreparedData", "SharingConfig", "SharingPlan", "Split",
           "load_dataset", "make_plan", "prepare", "random_split"]
