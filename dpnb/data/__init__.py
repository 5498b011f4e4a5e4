"""The records: reading and checking labelled text, the record format, text statistics.

`sources` (local files, folders or the Hub, every problem one line), `prompts` (label + delimiter +
review, or the model's chat template, tokenised and cut to max_length), `textstats` (counts,
lengths, diversity and their figures). The prepare stage (`dpnb.stages.prepare`) runs them.
"""
