def pipo_generate_entry(model, stock_generate, inputs=None, generation_config=None, **kwargs):
    return stock_generate(inputs, generation_config, **kwargs)
