"""tf_dpfair: differentially private, fairness-aware training of Keras image classifiers."""
