"""serlens.models"""
