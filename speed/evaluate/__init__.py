"""Evaluation: FID, Inception Score, improved precision/recall, the digits classifier metrics, and the
in-training evaluator of any small dataset (``dataset_fid``: ``fid_<dataset>``)."""

from speed.evaluate.digits import (
    DigitsClassifier,
    default_classifier_uri,
    digits_metrics,
    get_digits_classifier,
    train_digits_classifier,
)
from speed.evaluate.dataset_fid import (
    DatasetEvaluator,
    EvalData,
    dataset_name,
    eval_data_from_arrays,
    eval_data_from_config,
    fid_metric_name,
    get_dataset_evaluator,
)
from speed.evaluate.features import ExtractorSpec, FeatureWorker
from speed.evaluate.inception import (
    INCEPTION_SHA256_PREFIX,
    INCEPTION_WEIGHTS_FILE,
    InceptionFeatures,
    InceptionWeightsError,
    load_inception,
    load_inception_state_dict,
)
from speed.evaluate.precision_recall import manifold_radii, precision_recall
from speed.evaluate.reference import (
    ReferenceStatistics,
    load_reference_cache,
    pr_subset,
    reference_cache_uri,
    save_reference_cache,
    summarize,
)
from speed.evaluate.sources import ArraySource, ImageFolderSource, NpzSource, ParquetSource
from speed.evaluate.stats import (
    FeatureStatistics,
    RunningStatistics,
    class_accuracy,
    feature_statistics,
    frechet_distance,
    inception_score,
)

__all__ = [
    "ArraySource",
    "DatasetEvaluator",
    "DigitsClassifier",
    "EvalData",
    "ExtractorSpec",
    "FeatureStatistics",
    "FeatureWorker",
    "INCEPTION_SHA256_PREFIX",
    "INCEPTION_WEIGHTS_FILE",
    "ImageFolderSource",
    "InceptionFeatures",
    "InceptionWeightsError",
    "NpzSource",
    "ParquetSource",
    "ReferenceStatistics",
    "RunningStatistics",
    "class_accuracy",
    "dataset_name",
    "default_classifier_uri",
    "digits_metrics",
    "eval_data_from_arrays",
    "eval_data_from_config",
    "feature_statistics",
    "fid_metric_name",
    "frechet_distance",
    "get_dataset_evaluator",
    "get_digits_classifier",
    "inception_score",
    "load_inception",
    "load_inception_state_dict",
    "load_reference_cache",
    "manifold_radii",
    "pr_subset",
    "precision_recall",
    "reference_cache_uri",
    "save_reference_cache",
    "summarize",
    "train_digits_classifier",
]
