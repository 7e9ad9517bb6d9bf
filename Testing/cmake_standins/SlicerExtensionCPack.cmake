# Stand-in for Slicer's SlicerExtensionCPack.cmake (Slicer/Slicer 583e9b3): the same sanity checks (non-empty
# EXTENSION_NAME, Slicer_REVISION, Slicer_OS, Slicer_ARCHITECTURE; EXTENSION_README_FILE and EXTENSION_LICENSE_FILE
# exist), then the extension description (the real one generates <name>.s4ext for the extensions index).
foreach(_var EXTENSION_NAME Slicer_REVISION Slicer_OS Slicer_ARCHITECTURE)
  if("${${_var}}" STREQUAL "")
    message(FATAL_ERROR "error: ${_var} is either NOT defined or empty.")
  endif()
endforeach()
foreach(_var EXTENSION_README_FILE EXTENSION_LICENSE_FILE)
  if(NOT EXISTS ${${_var}})
    message(FATAL_ERROR "error: ${_var} points to an inexistent file: ${${_var}}")
  endif()
endforeach()
set(_description "")
foreach(_var HOMEPAGE CATEGORY CONTRIBUTORS DESCRIPTION ICONURL SCREENSHOTURLS DEPENDS)
  string(APPEND _description "${_var} ${EXTENSION_${_var}}\n")
endforeach()
file(WRITE ${CMAKE_BINARY_DIR}/${EXTENSION_NAME}.s4ext "${_description}")
