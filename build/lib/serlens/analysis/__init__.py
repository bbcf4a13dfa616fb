"""serlens.analysis"""
