"""serlens.report"""
