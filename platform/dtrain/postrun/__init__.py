"""postrun"""
