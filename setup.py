"""Installs tf_dpfair; all metadata lives in setup.cfg."""
import setuptools

setuptools.setup()
