"""serlens.train"""
