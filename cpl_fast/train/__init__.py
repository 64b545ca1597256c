"""cpl_fast.train"""
