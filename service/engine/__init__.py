"""service/engine"""
