"""cpl_fast.data"""
