"""Readers, datalist builders and synthetic generators for BUSI and Synapse (BTCV) layouts."""
