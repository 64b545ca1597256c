"""cpl_fast.models"""
