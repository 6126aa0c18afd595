"""FID, KID and precision/recall on a pluggable feature network (never downloaded)."""
from batikfast.metrics.compute import (METRICS, compute_metrics, dataset_features,
                                       generator_features, metrics_from_features, to_uint8)
from batikfast.metrics.features import (FeatureExtractor, FeatureNetworkError, SmallFeatureNet,
                                        load_feature_network)
from batikfast.metrics.stats import (feature_stats, fid_from_features, frechet_distance,
                                     kernel_inception_distance, precision_recall)

__all__ = ["METRICS", "compute_metrics", "dataset_features", "generator_features",
           "metrics_from_features", "to_uint8", "FeatureExtractor", "FeatureNetworkError", "SmallFeatureNet",
           "load_feature_network", "feature_stats", "fid_from_features", "frechet_distance",
           "kernel_inception_distance", "precision_recall"]
