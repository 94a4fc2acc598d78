"""tf_dpfair: differentially private, fairness-aware training of Keras image classifiers."""

from tf_dpfair import accounting
from tf_dpfair import audit
from tf_dpfair import augment
from tf_dpfair import calibration
from tf_dpfair import callbacks
from tf_dpfair import cluster
from tf_dpfair import dashboard_sweep
from tf_dpfair import dashboards
from tf_dpfair import diagnostics
from tf_dpfair import data
from tf_dpfair import datasets
from tf_dpfair import error_rates
from tf_dpfair import fairness
from tf_dpfair import metrics
from tf_dpfair import models
from tf_dpfair import rate_metrics
from tf_dpfair import reports
from tf_dpfair import resume
from tf_dpfair import sampling
from tf_dpfair import thresholds
from tf_dpfair.config import DPConfig
from tf_dpfair.grouped import NonPrivateModel
from tf_dpfair.grouped import make_non_private
from tf_dpfair.model import DPModel
from tf_dpfair.model import DPTraining
from tf_dpfair.model import PrivateModel
from tf_dpfair.model import make_private

__version__ = "0.1.0"
