# tests/checkpoint_doc.cmake - the Python snippet of docs/checkpoint-format.md
# run on a checkpoint kdkit train writes (tests/checkpoint_doc.py).
add_test(NAME checkpoint_doc_snippet
         COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/checkpoint_doc.py
                 $<TARGET_FILE:kdkit_cli> ${PROJECT_SOURCE_DIR}
                 ${CMAKE_CURRENT_BINARY_DIR}/checkpoint_doc)
set_tests_properties(checkpoint_doc_snippet PROPERTIES TIMEOUT 300)
