"""serlens.corpus"""
