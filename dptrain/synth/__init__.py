"""DP synthetic data (text first): label histograms through a DP mechanism, fine-tuning, generation."""

from dptrain.synth.histogram import dp_label_counts, records_per_label

__all__ = ["dp_label_counts", "records_per_label"]
