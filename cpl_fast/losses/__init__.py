"""cpl_fast.losses"""
