# The official OpenAI Node SDK (pinned by tests/openai_sdk/package-lock.json)
# drives `kdkit serve --toy`: chat, completions, embeddings in both
# encodings, streaming, models, logprobs, errors, the bearer key; and the
# SDK and `kdkit teacher ask` against the same recorded responses.
add_test(NAME openai_sdk_compat COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/openai_sdk/run.sh)
set_tests_properties(openai_sdk_compat PROPERTIES TIMEOUT 300
  ENVIRONMENT "KDKIT=$<TARGET_FILE:kdkit_cli>")
